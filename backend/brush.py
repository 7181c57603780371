"""Fast, defensive Label Studio brush RLE codec for single-channel masks, and a draft's strokes.

Label Studio stores brush masks as a thi.ng rle-pack bitstream over RGBA bytes, and the SDK's
codec walks it one bit at a time in pure Python: seconds per graded 1024x1024 attention map, paid
on every task. This module writes byte-identical streams and reads them with numpy; since the
streams come from the network, it checks sizes before allocating and raises
:class:`BrushDecodeError` on bad input instead of hanging.

Format (most significant bit first): count:32, word_size-1:5, four length-field widths-1:4 each,
then records of flag:1 width_index:2 length-1, followed by one word (flag 1, repeat) or
``length`` words (flag 0, literal). The SDK writes word size 8, widths (3, 4, 8, 16), only repeat
records, and 1 to 8 zero bits of padding (a whole zero byte if the stream is byte-aligned).
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

MAX_PIXELS = 2**28
"""Largest mask (height * width) either direction accepts: 1 GiB of RGBA, far beyond any image
Label Studio can display, yet small enough that the 32-bit count header cannot overflow."""

HEADER_BITS = 53
WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
_MAX_RECORD = 1 << RLE_SIZES[-1]  # values one repeat record holds with the widest length field
_HEADER = (
    (WORD_SIZE - 1) << 16
    | (RLE_SIZES[0] - 1) << 12
    | (RLE_SIZES[1] - 1) << 8
    | (RLE_SIZES[2] - 1) << 4
    | (RLE_SIZES[3] - 1)
)
_KIND_BY_PIXELS = np.array([0, 0, 0, 1, 1] + [2] * 60 + [3], dtype=np.intp)
"""Length-field choice of the SDK for a run of 1, 2, ... alpha pixels (4 RGBA bytes each):
up to 8 RGBA bytes use sizes[0], up to 16 sizes[1], up to 256 sizes[2], longer runs sizes[3]."""
_WIDTH = np.array([3 + s + WORD_SIZE for s in RLE_SIZES], dtype=np.uint64)
_PREFIX = np.array(
    [(4 | kind) << (s + WORD_SIZE) for kind, s in enumerate(RLE_SIZES)], dtype=np.uint64
)


class BrushDecodeError(ValueError):
    """An RLE stream that cannot be a brush mask of the requested size."""


# --------------------------------------------------------------------------- encode


def encode_rle(alpha: np.ndarray) -> list[int]:
    """Encode an (H, W) uint8 alpha mask exactly as ``label_studio_sdk``'s ``mask2rle`` does.

    Runs are found on the alpha values and scaled by four, since R=G=B=A makes every RGBA run
    exactly four times an alpha run; each run becomes one fixed-format record, and the records
    are laid out with vectorised shifts instead of bit strings.
    """
    flat = _check_alpha(alpha)
    n = flat.size
    change = np.flatnonzero(flat[1:] != flat[:-1])
    starts = np.empty(change.size + 1, dtype=np.int64)
    starts[0] = 0
    np.add(change, 1, out=starts[1:])
    values = flat[starts].astype(np.uint64)
    pixels = np.diff(starts, append=n)
    kind = _KIND_BY_PIXELS[np.minimum(pixels, _KIND_BY_PIXELS.size - 1)]
    length = pixels.astype(np.uint64) * np.uint64(4)
    if pixels.max() * 4 > _MAX_RECORD:
        # The SDK splits long runs into 65536-value records but picks the length field from
        # the whole run, so every piece (even a short remainder) keeps the 16-bit field.
        pieces = (pixels * 4 - 1) // _MAX_RECORD + 1
        last = np.cumsum(pieces) - 1
        piece_length = np.full(int(last[-1]) + 1, _MAX_RECORD, dtype=np.uint64)
        piece_length[last] = pixels * 4 - (pieces - 1) * _MAX_RECORD
        values = np.repeat(values, pieces)
        kind = np.repeat(kind, pieces)
        length = piece_length

    width = _WIDTH[kind]
    code = _PREFIX[kind] | ((length - np.uint64(1)) << np.uint64(WORD_SIZE)) | values
    end = np.cumsum(width)
    start = end - width + np.uint64(HEADER_BITS)
    total_bits = int(end[-1]) + HEADER_BITS
    out_len = total_bits // 8 + 1  # the SDK always pads with 1..8 zero bits

    # Left-align each record in the 64 bits starting at its 32-bit word: a record has at most
    # 27 bits and starts at most 31 bits in, so it lands in that word and the next. Records
    # never share bits, so summing their contributions per word is the same as OR-ing them.
    placed = code << (np.uint64(64) - (start & np.uint64(31)) - width)
    word = (start >> np.uint64(5)).view(np.int64)
    n_words = out_len // 4 + 2
    words = np.bincount(word, weights=placed >> np.uint64(32), minlength=n_words)
    low = np.bincount(word, weights=placed & np.uint64(0xFFFFFFFF), minlength=n_words)
    words[1:] += low[:-1]
    header = ((n * 4) << 21 | _HEADER) << (64 - HEADER_BITS)
    words[0] += header >> 32
    words[1] += header & 0xFFFFFFFF
    return list(words.astype(">u4").tobytes()[:out_len])


def _check_alpha(alpha: np.ndarray) -> np.ndarray:
    """Reject inputs the SDK would mis-encode or that Label Studio cannot show, flatten the rest."""
    if not isinstance(alpha, np.ndarray):
        raise ValueError(f"alpha must be a numpy array, got {type(alpha).__name__}")
    if alpha.dtype == np.bool_:
        raise ValueError(
            "alpha is a bool array; Label Studio reads brush opacity as 0..255, "
            "so convert explicitly, e.g. mask.astype(np.uint8) * 255"
        )
    if alpha.dtype != np.uint8:
        raise ValueError(f"alpha must be uint8 (0..255 opacity), got {alpha.dtype}")
    if alpha.ndim != 2:
        raise ValueError(f"alpha must be 2-D (height, width), got shape {alpha.shape}")
    if alpha.size == 0:
        raise ValueError(f"alpha is empty (shape {alpha.shape}); a brush mask needs pixels")
    if alpha.size > MAX_PIXELS:
        raise ValueError(f"alpha has {alpha.size} pixels, more than the {MAX_PIXELS} limit")
    return alpha.ravel()


# --------------------------------------------------------------------------- decode

_PAD_BYTES = 24  # zero bytes after the data, so windows and jump lookups never run off the end
_CHUNK_BYTES = 1 << 16  # stream bytes per jump table of the sequential walk (bounds scratch)
_LOCKSTEP_MIN_BITS = 1 << 20  # below this the sequential walk is about as fast
_SEGMENT_BITS = 8192  # stream bits per lane of the lockstep walk
_LOCKSTEP_BATCH = 16  # lockstep steps between checks that every lane is done
_VISITED = 0x80  # flag bit in the lockstep jump table: "on the path of this segment's lane"


class _Records(NamedTuple):
    """Record headers in stream order, one entry per record."""

    start: np.ndarray  # first bit of the record (int64)
    window: np.ndarray  # the 64 stream bits from ``start`` (uint64)
    is_repeat: np.ndarray  # flag bit (bool)
    field: np.ndarray  # width of the length field in bits (int64)
    length: np.ndarray  # number of values the record produces (int64)


def decode_rle(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode a brush RLE stream into the (height, width) uint8 alpha channel.

    Records form a chain (each header says where the next starts), which is the only
    sequential part: it is followed either by a Python loop doing one table lookup per record
    or, for long streams, by many speculative walks in lockstep (see :func:`_lockstep_chain`).
    Reading lengths and values and expanding runs is vectorised, and only the alpha byte of
    each RGBA pixel is materialised.

    Accepts a list or tuple of ints, bytes-like objects or a 1-D integer array. Raises
    :class:`BrushDecodeError` unless the stream yields exactly ``height * width * 4`` values;
    bits after the last record are ignored, as the SDK and the frontend do.
    """
    num = _check_size(height, width) * 4
    data = _as_bytes(rle)
    if len(data) * 8 < HEADER_BITS:
        raise BrushDecodeError(
            f"RLE stream is truncated: {len(data)} bytes cannot hold the {HEADER_BITS}-bit header"
        )
    header = int.from_bytes(data[:7], "big") >> 3
    count = header >> 21
    if count != num:
        raise BrushDecodeError(
            f"RLE header counts {count} RGBA values but a {height}x{width} mask has {num}"
        )
    word_size = ((header >> 16) & 31) + 1
    sizes = tuple(((header >> shift) & 15) + 1 for shift in (12, 8, 4, 0))

    # No valid stream needs more bits than one widest record per value; anything after that
    # is ignored (as trailing bits are anyway), so garbage cannot inflate the scratch memory.
    max_bytes = (HEADER_BITS + num * (3 + max(sizes) + word_size) + 7) // 8
    if len(data) > max_bytes:
        data = data[:max_bytes]
    nbits = len(data) * 8
    padded = np.zeros((len(data) + _PAD_BYTES) // 8 * 8, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    words = padded.view(">u8").astype(np.uint64)
    table = _jump_table(word_size, sizes)
    size_array = np.array(sizes, dtype=np.uint64)
    parts: list[_Records] = []
    bit, produced = HEADER_BITS, 0
    if nbits >= _LOCKSTEP_MIN_BITS:
        chain, bit = _lockstep_chain(padded, nbits, table)
        records = _read_records(words, chain, size_array)
        literal = np.flatnonzero(~records.is_repeat)
        if literal.size:  # the lanes only follow repeat records; walk on from the first literal
            bit = int(chain[literal[0]])
            records = _Records(*(column[: literal[0]] for column in records))
        parts.append(records)
        produced = int(records.length.sum())
    if produced < num:
        parts += _walk(padded, words, nbits, num, bit, produced, table, sizes, word_size)
    records = _Records(*(np.concatenate(column) for column in zip(*parts, strict=True)))
    records = _trim(records, num, nbits, word_size)

    length = records.length
    if records.is_repeat.all():
        value_at = (records.field + 3).astype(np.uint64)
        values = ((records.window << value_at) >> np.uint64(64 - word_size)).astype(np.int64)
    else:
        # Expand literal records into one single-value run per word.
        per_record = np.where(records.is_repeat, 1, length)
        record = np.repeat(np.arange(per_record.size), per_record)
        offset = np.arange(record.size) - np.repeat(np.cumsum(per_record) - per_record, per_record)
        first_word = records.start + 3 + records.field
        values = _read_bits(words, first_word[record] + offset * word_size, word_size)
        length = np.where(records.is_repeat[record], length[record], 1)
    if word_size > 8 and values.size and int(values.max()) > 255:
        raise BrushDecodeError(f"RLE holds value {int(values.max())}, outside 0..255")

    # A run covering RGBA bytes [s, e) covers the alpha bytes 4i+3 with s//4 <= i < e//4.
    end = np.cumsum(length)
    alpha_count = (end >> 2) - ((end - length) >> 2)
    return np.repeat(values.astype(np.uint8), alpha_count).reshape(height, width)


def _trim(records: _Records, num: int, nbits: int, word_size: int) -> _Records:
    """Keep the records that produce exactly ``num`` values, or say why the stream cannot."""
    total = np.cumsum(records.length)
    last = int(np.searchsorted(total, num))
    if last == total.size:
        raise BrushDecodeError(
            f"RLE stream is truncated: it ends after {int(total[-1])} of {num} values"
        )
    if total[last] != num:
        raise BrushDecodeError(
            f"RLE run at bit {int(records.start[last])} overflows the mask: it covers values "
            f"{int(total[last] - records.length[last])}..{int(total[last])} "
            f"but there are only {num}"
        )
    words = word_size if records.is_repeat[last] else int(records.length[last]) * word_size
    end_bit = int(records.start[last] + 3 + records.field[last]) + words
    if end_bit > nbits:
        raise BrushDecodeError(
            f"RLE stream is truncated: its last run needs {end_bit} bits but it has {nbits}"
        )
    return _Records(*(column[: last + 1] for column in records))


def _walk(
    padded: np.ndarray,
    words: np.ndarray,
    nbits: int,
    num: int,
    bit: int,
    produced: int,
    table: np.ndarray,
    sizes: tuple[int, ...],
    word_size: int,
) -> list[_Records]:
    """Follow the record chain from ``bit`` until ``num`` values are produced, one step a record.

    The jump table is built for one chunk of the stream at a time, and the loop does one lookup
    per repeat record; literal records are measured in Python from their length field.
    """
    raw = padded.tobytes()
    size_array = np.array(sizes, dtype=np.uint64)

    def literal_jump(at: int) -> int:
        window = (int.from_bytes(raw[at >> 3 : (at >> 3) + 4], "big") << (at & 7)) & 0xFFFFFFFF
        field = sizes[(window >> 29) & 3]
        return 3 + field + (((window >> (29 - field)) & ((1 << field) - 1)) + 1) * word_size

    parts = []
    nbytes = nbits // 8
    while produced < num:
        if bit >= nbits:
            raise BrushDecodeError(
                f"RLE stream is truncated: it ends after {produced} of {num} values"
            )
        first = bit >> 3
        last = min(first + _CHUNK_BYTES, nbytes)
        jumps = memoryview(_jumps(padded, table, first, last))
        base = first * 8
        local = bit - base
        stop = (last - first) * 8
        found = array("q")
        add = found.append
        while local < stop:
            add(local)
            step = jumps[local]
            local += literal_jump(base + local) if step == 1 else step
        bit = base + local
        records = _read_records(words, np.frombuffer(found, dtype=np.int64) + base, size_array)
        parts.append(records)
        produced += int(records.length.sum())
    return parts


def _lockstep_chain(padded: np.ndarray, nbits: int, table: np.ndarray) -> tuple[np.ndarray, int]:
    """Find the record chain of a long stream with many walks at once.

    Returns candidate record starts in order and the bit where the search stopped (``nbits``,
    or a literal head met while bridging). The candidates are exact up to the first literal
    record among them, which the caller must check for.

    Each lane starts at a segment boundary, usually in the middle of a record, and follows the
    jump table, stepping one bit at literal heads. Every lane's walk is a path of the same
    deterministic map, and so is the true chain while it holds only repeat records, so a lane
    that touches the chain stays on it (on graded maps a lane from a random bit joins the chain
    after about 700 bits on average, 6000 at the 99th percentile).
    Each lane walks on past its segment until it lands on the next lane's path; the chain is
    then lane 0 up to that point, lane 1 from there to its own merge, and so on. Where a lane
    fails to merge, a sequential walk bridges the gap.
    """
    jumps = _jumps(padded, table, 0, padded.size - 1)
    jumps[nbits:] = 0  # lanes that run off the end stay there
    begin = np.arange(HEADER_BITS, nbits, _SEGMENT_BITS)
    end = np.append(begin[1:], nbits)
    target = np.minimum(end + _SEGMENT_BITS // 2, nbits)
    at = begin
    steps = [at]
    while True:
        for _ in range(_LOCKSTEP_BATCH):
            at = at + jumps.take(at)
            steps.append(at)
        if (at >= target).all():
            break
    path = np.stack(steps, axis=1)  # one row per lane, increasing along the row

    # Mark each lane's positions inside its own segment with the top bit of the jump entry
    # (jumps are at most 51), then find where each lane first lands on a marked position in
    # the next segment, which can only be the next lane's path.
    jumps[path[path < end[:, None]]] |= _VISITED
    next_end = np.append(end[1:], nbits)
    hit = (path >= end[:, None]) & (path < next_end[:, None]) & (jumps.take(path) >= _VISITED)
    merged = hit.any(axis=1)
    merge_at = path[np.arange(path.shape[0]), hit.argmax(axis=1)]

    lanes = begin.size
    low = np.zeros(lanes, dtype=np.int64)
    high = np.zeros(lanes, dtype=np.int64)
    bridge = array("q")
    add = bridge.append
    view = memoryview(jumps)
    stop_bit = nbits
    lane, bit = 0, HEADER_BITS
    while True:
        low[lane] = bit
        if lane == lanes - 1:
            high[lane] = nbits
            break
        if merged[lane]:
            high[lane] = bit = int(merge_at[lane])
            lane += 1
            continue
        high[lane] = bit = int(path[lane, -1])
        while bit < nbits:
            step = view[bit]
            if step >= _VISITED:
                break
            if step == 1:
                stop_bit = bit
                break
            add(bit)
            bit += step
        if bit >= nbits or stop_bit < nbits:
            break
        lane = (bit - HEADER_BITS) // _SEGMENT_BITS

    chain = path[(path >= low[:, None]) & (path < high[:, None])]
    if len(bridge):
        extra = np.frombuffer(bridge, dtype=np.int64)
        chain = np.insert(chain, np.searchsorted(chain, extra), extra)
    return chain, stop_bit


@functools.lru_cache(maxsize=8)
def _jump_table(word_size: int, sizes: tuple[int, ...]) -> np.ndarray:
    """Bits from a repeat record's start to the next record, for every (two-byte window, bit).

    A repeat record's length depends only on its first three bits, which lie in the byte it
    starts in and the next; literal heads get 1 (repeat jumps are at least 5), which the
    sequential walk treats as "measure this literal" and the lockstep walk as a one-bit step.
    """
    pair = np.arange(1 << 16, dtype=np.uint32)[:, None]
    head = (pair >> (13 - np.arange(8, dtype=np.uint32))) & 7
    by_head = np.array([1, 1, 1, 1] + [3 + s + word_size for s in sizes], dtype=np.uint8)
    table = by_head[head]
    table.flags.writeable = False
    return table


def _jumps(padded: np.ndarray, table: np.ndarray, first: int, last: int) -> np.ndarray:
    """Jump-table entries for the bit positions of bytes ``first`` to ``last`` (exclusive)."""
    pairs = (padded[first:last].astype(np.uint16) << 8) | padded[first + 1 : last + 1]
    return table.view(np.uint64)[:, 0].take(pairs).view(np.uint8)


def _read_records(words: np.ndarray, start: np.ndarray, size_array: np.ndarray) -> _Records:
    """Decode the headers of the records starting at ``start``."""
    window = _windows(words, start)
    head = window >> np.uint64(61)
    field = size_array[head & np.uint64(3)]
    length = ((window << np.uint64(3)) >> (np.uint64(64) - field)).astype(np.int64) + 1
    return _Records(start, window, head >= 4, field.astype(np.int64), length)


def _windows(words: np.ndarray, bit: np.ndarray) -> np.ndarray:
    """The 64 stream bits starting at each bit position, as uint64, from two aligned words.

    ``words`` is the zero-padded stream as native uint64 (read big-endian).
    """
    index = bit >> 6
    shift = (bit & 63).astype(np.uint64)
    # Two shifts for the low part, since shifting a uint64 by 64 is undefined.
    low = (words.take(index + 1) >> np.uint64(1)) >> (np.uint64(63) - shift)
    return (words.take(index) << shift) | low


def _read_bits(words: np.ndarray, bit: np.ndarray, count: int) -> np.ndarray:
    """The ``count``-bit unsigned integers starting at each bit position."""
    return (_windows(words, bit) >> np.uint64(64 - count)).astype(np.int64)


def _check_size(height: int, width: int) -> int:
    """Validate the mask size before anything is allocated from it; returns height * width."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise BrushDecodeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise BrushDecodeError(f"{name} must be positive, got {value}")
    pixels = int(height) * int(width)
    if pixels > MAX_PIXELS:
        raise BrushDecodeError(
            f"mask size {height}x{width} ({pixels} pixels) exceeds the {MAX_PIXELS} pixel limit"
        )
    return pixels


def _as_bytes(rle: Sequence[int] | bytes | np.ndarray) -> bytes | bytearray:
    """The stream as bytes, rejecting anything that is not a sequence of ints in 0..255."""
    if isinstance(rle, bytes | bytearray | memoryview):
        return bytes(rle)
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or rle.dtype.kind not in "iu":
            raise BrushDecodeError(
                f"RLE must be a 1-D integer array, got {rle.dtype} with shape {rle.shape}"
            )
        bad = np.flatnonzero((rle < 0) | (rle > 255))
        if bad.size:
            raise BrushDecodeError(_bad_item(int(bad[0]), rle[bad[0]].item()))
        return rle.astype(np.uint8).tobytes()
    if not isinstance(rle, list | tuple):
        raise BrushDecodeError(f"RLE must be a list of ints, got {type(rle).__name__}")
    try:
        return bytearray(rle)  # three times faster than bytes() for a list of ints
    except (TypeError, ValueError):
        for index, item in enumerate(rle):
            if not isinstance(item, int | np.integer) or not 0 <= item <= 255:
                raise BrushDecodeError(_bad_item(index, item)) from None
        raise  # bytes() failed for a reason the scan cannot name


def _bad_item(index: int, item: object) -> str:
    """Say what is wrong with one element of an RLE list."""
    if not isinstance(item, int | np.integer):
        return f"RLE item {index} is a {type(item).__name__}, expected an int in 0..255"
    if item < 0:
        return f"RLE item {index} is negative ({item}); RLE items are bytes in 0..255"
    return f"RLE item {index} is {item}, larger than a byte (0..255)"


# --------------------------------------------------------------------------- strokes
# A draft keeps a brush as the editor has it in memory: the RLE it was loaded with and, in
# ``touches``, the strokes drawn since; only a submitted annotation's RLE has them painted in.

TOUCH_FILL = {"add": 255, "eraser": 0}
"""What a stroke leaves: the editor paints opaque black (``source-over``: alpha 255) or erases
(``destination-out``: alpha 0)."""
POINT_RANGE = (-100.0, 200.0)
"""Stroke points are percent of the image's width and height: one image-size out at most."""
MAX_STROKE_WIDTH = 200.0
"""Stroke widths are percent of the image's width."""
EDGE = 0.25
"""Pillow fills the pixels a shape's outline touches: drawn a quarter pixel thinner, a stroke
covers as many pixels as the pixel centres within its radius (0.3% apart on random
polylines, against 1.4% unchanged)."""


@dataclass(frozen=True)
class Stroke:
    """One of a draft's touches in image pixels."""

    fill: int  # 255 painted, 0 erased
    points: np.ndarray  # (n, 2) float64 x, y: the polyline, in order
    radius: float  # half the line width


def strokes(touches: object, width: int, height: int) -> list[Stroke]:
    """A brush value's ``touches`` in image pixels, or a :class:`BrushDecodeError` that says
    which one is not a stroke. The editor converts ``relativePoints`` (percent of the width
    and the height) and ``relativeStrokeWidth`` (percent of the width) to pixels the same way."""
    if not isinstance(touches, list):
        raise BrushDecodeError(f"touches must be a list of strokes, got {type(touches).__name__}")
    out = []
    low, high = POINT_RANGE
    for index, touch in enumerate(touches):
        where = f"touch {index}"
        if not isinstance(touch, dict):
            raise BrushDecodeError(f"{where} must be an object")
        kind = touch.get("type", "add")
        if kind not in TOUCH_FILL:
            raise BrushDecodeError(f"{where}: type must be one of {', '.join(TOUCH_FILL)}")
        points = _numbers(touch.get("relativePoints"), f"{where}: relativePoints")
        if points.size == 0 or points.size % 2:
            raise BrushDecodeError(f"{where}: relativePoints must hold x, y pairs")
        if points.min() < low or points.max() > high:
            raise BrushDecodeError(f"{where}: relativePoints must be in {low:g}..{high:g}")
        line = _numbers([touch.get("relativeStrokeWidth", 25)], f"{where}: relativeStrokeWidth")
        if not 0 < line[0] <= MAX_STROKE_WIDTH:
            raise BrushDecodeError(
                f"{where}: relativeStrokeWidth must be in (0, {MAX_STROKE_WIDTH:g}]"
            )
        xy = points.reshape(-1, 2) * np.array([width / 100, height / 100])
        out.append(Stroke(TOUCH_FILL[kind], xy, float(line[0]) * width / 200))
    return out


def _numbers(value: object, what: str) -> np.ndarray:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise BrushDecodeError(f"{what} must be a list of numbers")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise BrushDecodeError(f"{what} must be finite numbers")
    return array


ROW_COST = 256
"""Pillow fills a shape row by row: one row costs about as much as 256 pixels of it."""


def stroke_cost(drawn: list[Stroke], width: int, height: int) -> int:
    """About how much painting `drawn` costs, in pixels filled: the box of every disc and band
    it draws, clipped to the image, with each box row at :data:`ROW_COST`. What the budget of a
    draft's strokes counts (measured: 512 M takes about a tenth of a second)."""
    total = 0
    for stroke in drawn:
        x, y, r = stroke.points[:, 0], stroke.points[:, 1], stroke.radius
        boxes = [(x - r, y - r, x + r, y + r)]
        if len(x) > 1:
            boxes.append(
                (
                    np.minimum(x[:-1], x[1:]) - r,
                    np.minimum(y[:-1], y[1:]) - r,
                    np.maximum(x[:-1], x[1:]) + r,
                    np.maximum(y[:-1], y[1:]) + r,
                )
            )
        for left, top, right, bottom in boxes:
            columns = np.clip(right + 1, 0, width) - np.clip(left, 0, width)
            rows = np.clip(bottom + 1, 0, height) - np.clip(top, 0, height)
            total += int((rows * (columns + ROW_COST)).sum())
    return total


def paint_strokes(alpha: np.ndarray, drawn: list[Stroke]) -> np.ndarray:
    """`alpha` with `drawn` painted over it in order, as the editor exports a brush: each
    stroke is its polyline widened by its radius (round caps and joins: a disc at every point
    and a band along every segment). A pixel is in or out; the editor's anti-aliased edge, a
    pixel wide, is the one difference."""
    if not drawn:
        return alpha
    image = Image.fromarray(alpha)
    draw = ImageDraw.Draw(image)
    for stroke in drawn:
        r, fill = max(stroke.radius - EDGE, 0.0), stroke.fill
        for x, y in stroke.points.tolist():
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        for corners in _bands(stroke.points, r):
            draw.polygon(corners, fill=fill)
    return np.asarray(image).copy()


def _bands(points: np.ndarray, r: float) -> list[list[float]]:
    """The four corners of the band `r` either side of every segment of `points` with a length."""
    start, end = points[:-1], points[1:]
    step = end - start
    length = np.hypot(step[:, 0], step[:, 1])
    keep = length > 0
    start, end, step, length = start[keep], end[keep], step[keep], length[keep]
    normal = np.stack([-step[:, 1], step[:, 0]], axis=1) * (r / length)[:, None]
    corners = np.concatenate([start + normal, end + normal, end - normal, start - normal], axis=1)
    return corners.tolist()
