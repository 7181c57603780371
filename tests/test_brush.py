"""Tests for backend.brush: byte-identical to the Label Studio SDK, and safe on bad input.

The SDK's pure-Python codec is the oracle. Sizes stay small because the SDK decoder reads one
bit at a time.
"""

from __future__ import annotations

import itertools
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter import brush as sdk

from backend import brush
from backend.brush import BrushDecodeError, decode_rle, encode_rle

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sdk_alpha(rle: list[int], height: int, width: int) -> np.ndarray:
    """How Label Studio's converter reads a brush mask: all RGBA bytes, then alpha."""
    return sdk.decode_rle(rle).reshape(height, width, 4)[:, :, 3]


def graded(height: int, width: int, levels: int, seed: int = 0) -> np.ndarray:
    """A small attention-like map: a random 5x5 grid bilinearly upsampled and quantised."""
    small = np.random.default_rng(seed).random((5, 5))
    ys = np.clip((np.arange(height) + 0.5) * 5 / height - 0.5, 0, 4)
    xs = np.clip((np.arange(width) + 0.5) * 5 / width - 0.5, 0, 4)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, 4), np.minimum(x0 + 1, 4)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = small[y0][:, x0] * (1 - fx) + small[y0][:, x1] * fx
    bottom = small[y1][:, x0] * (1 - fx) + small[y1][:, x1] * fx
    up = top * (1 - fy) + bottom * fy
    up = (up - up.min()) / max(up.max() - up.min(), 1e-12)
    quantised = np.minimum((up * levels).astype(int), levels - 1)
    return np.round(quantised * 255 / (levels - 1)).astype(np.uint8)


def pack(
    records: list[tuple[str, int, list[int]]], word_size: int = 8, sizes=(3, 4, 8, 16)
) -> list[int]:
    """Write rle-pack records as the frontend's encoder would, literal records included.

    Records are ("repeat", count, [value]) or ("literal", count, values); padding is 0..7 bits
    (the SDK always adds 1..8), so both conventions are exercised.
    """
    num = sum(count for _, count, _ in records)
    bits = [f"{num:032b}", f"{word_size - 1:05b}", *(f"{s - 1:04b}" for s in sizes)]
    for kind, count, values in records:
        index = next(i for i, s in enumerate(sizes) if count - 1 < 2**s)
        bits += ["1" if kind == "repeat" else "0", f"{index:02b}", f"{count - 1:0{sizes[index]}b}"]
        bits += [f"{v:0{word_size}b}" for v in values]
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


def lockstep(segment_bits: int):
    """Force the lockstep chain search, with small segments, on streams of any length."""
    return patch.multiple(brush, _LOCKSTEP_MIN_BITS=0, _SEGMENT_BITS=segment_bits)


# --------------------------------------------------------------------------- encode vs SDK

EXAMPLES = {
    "1x1 zero": np.zeros((1, 1), np.uint8),
    "1x1 255": np.full((1, 1), 255, np.uint8),
    "row": np.array([[0, 0, 5, 7, 7, 7, 7, 7, 7, 255]], np.uint8),
    "column": np.array([[1], [1], [2], [3], [3]], np.uint8),
    "odd noise": np.random.default_rng(1).integers(0, 256, (7, 13), dtype=np.uint8),
    "all 0 (split runs)": np.zeros((300, 301), np.uint8),
    "all 255 (split runs)": np.full((257, 255), 255, np.uint8),
    "run of exactly 65536 bytes": np.zeros((128, 128), np.uint8),
    "run of 65540 bytes": np.zeros((1, 16385), np.uint8),
    "binary blob": (graded(61, 47, 2) > 0).astype(np.uint8) * 255,
    "graded 8 levels": graded(97, 83, 8),
    "graded 256 levels": graded(64, 71, 256, seed=3),
    "non-contiguous": graded(40, 60, 8).T,
}


@pytest.mark.parametrize("alpha", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_examples_match_sdk(alpha: np.ndarray) -> None:
    rle = encode_rle(alpha)
    assert rle == sdk.mask2rle(alpha)
    assert np.array_equal(decode_rle(rle, *alpha.shape), alpha)
    assert np.array_equal(sdk_alpha(rle, *alpha.shape), alpha)


@FAST
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    alphabet=st.sampled_from([(0, 255), (0, 1, 2), tuple(range(256))]),
    data=st.data(),
)
def test_random_masks_match_sdk(shape: tuple[int, int], alphabet: tuple[int, ...], data) -> None:
    values = data.draw(st.lists(st.sampled_from(alphabet), min_size=shape[0] * shape[1]))
    alpha = np.array(values[: shape[0] * shape[1]], np.uint8).reshape(shape)
    rle = encode_rle(alpha)
    assert rle == sdk.mask2rle(alpha)
    assert np.array_equal(decode_rle(rle, *shape), alpha)
    assert np.array_equal(sdk_alpha(rle, *shape), alpha)


RUN_PIXELS = st.one_of(
    st.integers(1, 70), st.sampled_from([16383, 16384, 16385, 32768, 32769, 50000])
)


@FAST
@given(runs=st.lists(st.tuples(st.integers(0, 255), RUN_PIXELS), min_size=1, max_size=6))
def test_long_runs_match_sdk(runs: list[tuple[int, int]]) -> None:
    """Runs around the 65536-byte record limit, where the SDK splits them."""
    alpha = np.repeat([v for v, _ in runs], [n for _, n in runs]).astype(np.uint8)[None, :]
    rle = encode_rle(alpha)
    assert rle == sdk.mask2rle(alpha)
    assert np.array_equal(decode_rle(rle, *alpha.shape), alpha)


@pytest.mark.parametrize("levels", [8, 256])
@pytest.mark.parametrize("segment_bits", [128, 1000, 4096])
def test_lockstep_decode_of_graded_maps(levels: int, segment_bits: int) -> None:
    """The speculative chain search (normally only for long streams) on many small lanes."""
    for seed in range(3):
        alpha = graded(120, 130, levels, seed)
        rle = sdk.mask2rle(alpha)
        with lockstep(segment_bits):
            assert np.array_equal(decode_rle(rle, *alpha.shape), alpha)


def test_lockstep_decode_of_noise() -> None:
    alpha = np.random.default_rng(5).integers(0, 256, (60, 70), dtype=np.uint8)
    rle = sdk.mask2rle(alpha)
    for segment_bits in (128, 333, 2048):
        with lockstep(segment_bits):
            assert np.array_equal(decode_rle(rle, *alpha.shape), alpha)


def test_long_stream_uses_lockstep_and_matches() -> None:
    """A map big enough for the default lockstep threshold, checked against encode."""
    alpha = graded(512, 512, 256)
    rle = encode_rle(alpha)
    assert len(rle) * 8 >= brush._LOCKSTEP_MIN_BITS
    assert np.array_equal(decode_rle(rle, 512, 512), alpha)


# --------------------------------------------------------------------------- frontend streams


@st.composite
def frontend_streams(draw) -> tuple[list[int], np.ndarray, int]:
    """Streams with literal records, any word size up to 8 and any run-length sizes."""
    word_size = draw(st.integers(1, 8))
    sizes = tuple(draw(st.lists(st.integers(1, 16), min_size=4, max_size=4)))
    longest = min(2 ** max(sizes), 300)
    word = st.integers(0, 2**word_size - 1)
    records = []
    for _ in range(draw(st.integers(1, 12))):
        count = draw(st.integers(1, longest))
        if draw(st.booleans()):
            records.append(("repeat", count, [draw(word)]))
        else:
            records.append(("literal", count, draw(st.lists(word, min_size=count, max_size=count))))
    while sum(count for _, count, _ in records) % 4:
        records.append(("repeat", 1, [draw(word)]))
    segment_bits = draw(st.sampled_from([64, 128, 200, 1 << 20]))
    return pack(records, word_size, sizes), segment_bits


@FAST
@given(frontend_streams())
def test_frontend_streams_decode_like_sdk(stream: tuple[list[int], int]) -> None:
    rle, segment_bits = stream
    width = (int.from_bytes(bytes(rle[:4]), "big")) // 4
    expected = sdk_alpha(rle, 1, width)
    assert np.array_equal(decode_rle(rle, 1, width), expected)
    with lockstep(segment_bits):
        assert np.array_equal(decode_rle(rle, 1, width), expected)


def test_literal_after_long_repeat_stretch_in_lockstep() -> None:
    """A literal record deep in a long stream, after the lanes' repeat-only stretch."""
    records = [("repeat", 4 + (i % 13), [i % 251]) for i in range(400)]
    records.append(("literal", 5, [1, 2, 3, 4, 5]))
    records += [("repeat", 4, [7])] * 50
    records.append(("repeat", -sum(count for _, count, _ in records) % 4 or 4, [9]))
    rle = pack(records)
    width = sum(count for _, count, _ in records) // 4
    with lockstep(256):
        assert np.array_equal(decode_rle(rle, 1, width), sdk_alpha(rle, 1, width))


def test_trailing_bytes_are_ignored() -> None:
    """Like the SDK and the frontend, bits after the last needed record do not matter."""
    alpha = graded(30, 40, 8)
    rle = sdk.mask2rle(alpha) + [255] * 20_000
    assert np.array_equal(decode_rle(rle, 30, 40), alpha)
    with lockstep(128):
        assert np.array_equal(decode_rle(rle, 30, 40), alpha)


@pytest.mark.parametrize("container", [list, tuple, bytes, bytearray, np.array])
def test_decode_accepts_common_containers(container) -> None:
    alpha = graded(9, 11, 8)
    rle = sdk.mask2rle(alpha)
    assert np.array_equal(decode_rle(container(rle), 9, 11), alpha)


# --------------------------------------------------------------------------- garbage


def one_by_one(records: list[tuple[str, int, list[int]]]) -> list[int]:
    """A stream for a 1x1 mask (4 RGBA values) whatever the records say."""
    rle = pack(records)
    return [0, 0, 0, 4, *rle[4:]]


@pytest.mark.parametrize(
    ("rle", "height", "width", "message"),
    [
        ([], 1, 1, "truncated"),
        ([0, 0, 0, 4, 57], 1, 1, "truncated"),
        (sdk.mask2rle(np.zeros((3, 3), np.uint8))[:-2], 3, 3, "truncated"),
        (sdk.mask2rle(graded(20, 20, 8))[:-6], 20, 20, "truncated"),
        (sdk.mask2rle(np.zeros((3, 3), np.uint8)), 3, 4, "header counts 36 .* has 48"),
        ([255, 255, 255, 255, 0, 0, 0, 0], 1, 1, "header counts 4294967295"),
        (one_by_one([("repeat", 8, [1])]), 1, 1, "overflows"),
        (one_by_one([("repeat", 2, [1]), ("literal", 3, [1, 2, 3])]), 1, 1, "overflows"),
        ([0, 0, 0, -4, 57], 1, 1, "negative"),
        ([0, 0, 0, 4, 300], 1, 1, "larger than a byte"),
        ([0, 0, 0, 4, 1.5], 1, 1, "float, expected an int"),
        ([0, 0, 0, 4, "57"], 1, 1, "str, expected an int"),
        ([0, 0, 0, 4, None], 1, 1, "NoneType, expected an int"),
        ("0004", 1, 1, "must be a list"),
        (4, 1, 1, "must be a list"),
        (np.array([[0, 0], [0, 4]]), 1, 1, "1-D integer array"),
        (np.array([0.0, 0.0, 0.0, 4.0]), 1, 1, "1-D integer array"),
        (np.array([0, 0, 0, 4, 999]), 1, 1, "item 4 is 999"),
        ([0, 0, 0, 4], 2**15, 2**15, "exceeds the 268435456 pixel limit"),
        ([0, 0, 0, 4], 0, 5, "height must be positive"),
        ([0, 0, 0, 4], 5, -1, "width must be positive"),
        ([0, 0, 0, 4], 1.0, 1, "height must be an int"),
        ([0, 0, 0, 4], 1, True, "width must be an int"),
    ],
)
def test_garbage_raises(rle, height, width, message: str) -> None:
    with pytest.raises(BrushDecodeError, match=message):
        decode_rle(rle, height, width)


def test_value_wider_than_a_byte_raises() -> None:
    rle = [0, 0, 0, 4, *pack([("repeat", 4, [300])], word_size=9)[4:]]
    with pytest.raises(BrushDecodeError, match=r"value 300, outside 0\.\.255"):
        decode_rle(rle, 1, 1)


def test_bad_size_is_rejected_before_reading_the_stream() -> None:
    """A huge claimed size fails fast, whatever follows."""
    with pytest.raises(BrushDecodeError, match="pixel limit"):
        decode_rle([255] * 10, 2**20, 2**20)


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    body=st.binary(max_size=80),
    tail=st.binary(min_size=2, max_size=2),
    segment_bits=st.sampled_from([None, 64, 128]),
)
def test_random_bodies_decode_or_raise_cleanly(
    shape: tuple[int, int], body: bytes, tail: bytes, segment_bits: int | None
) -> None:
    """Random record data after a correct count (and random sizes): a mask or a clean error."""
    count = shape[0] * shape[1] * 4
    rle = [*count.to_bytes(4, "big"), *tail, *body]
    try:
        if segment_bits is None:
            alpha = decode_rle(rle, *shape)
        else:
            with lockstep(segment_bits):
                alpha = decode_rle(rle, *shape)
    except BrushDecodeError:
        return
    assert alpha.shape == shape
    assert alpha.dtype == np.uint8
    try:
        expected = sdk_alpha(rle, *shape)
    except (ValueError, IndexError, OverflowError):
        return  # the SDK chokes on some streams we accept, e.g. trailing garbage it reads
    assert np.array_equal(alpha, expected)


# --------------------------------------------------------------------------- encode rejects


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (np.zeros((3, 3), bool), "bool array"),
        (np.zeros((3, 3), np.float32), "must be uint8"),
        (np.zeros((3, 3), np.int64), "must be uint8"),
        (np.zeros((3, 3, 4), np.uint8), "must be 2-D"),
        (np.zeros(9, np.uint8), "must be 2-D"),
        (np.zeros((0, 5), np.uint8), "empty"),
        ([[0, 1], [1, 0]], "numpy array"),
        (np.broadcast_to(np.uint8(0), (2**14 + 1, 2**14)), "limit"),
    ],
)
def test_encode_rejects(alpha, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_rle(alpha)


def test_decoding_costs_about_a_byte_per_pixel() -> None:
    """The alpha is the only large allocation, however many runs the stream has."""
    import tracemalloc

    alpha = graded(2048, 2048, 8)
    rle = encode_rle(alpha)
    tracemalloc.start()
    try:
        decoded = decode_rle(rle, 2048, 2048)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(decoded, alpha)
    assert peak < 2.5 * alpha.size, f"{peak / alpha.size:.2f} bytes per pixel"


# --------------------------------------------------------------------------- a draft's strokes


def distance_to(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Each pixel centre's distance to the polyline `points` (x, y in pixels)."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    nearest = np.full((height, width), np.inf)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
        nearest = np.minimum(nearest, np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)))
    return nearest


def test_a_stroke_covers_its_polyline_widened_with_round_ends() -> None:
    """What the editor's canvas paints: pixel centres within half the line width (percent of
    the image's width) of the polyline (percent of width and height), round caps and joins."""
    width, height = 200, 120
    touch = {"type": "add", "relativePoints": [10, 20, 60, 80, 90, 30], "relativeStrokeWidth": 8}
    [stroke] = brush.strokes([touch], width, height)
    np.testing.assert_allclose(stroke.points, [[20, 24], [120, 96], [180, 36]])
    assert stroke.radius == 8
    painted = brush.paint_strokes(np.zeros((height, width), np.uint8), [stroke])
    distance = distance_to(stroke.points, height, width)
    assert set(np.unique(painted)) == {0, 255}
    assert (painted[distance < stroke.radius - 1] == 255).all()
    assert (painted[distance > stroke.radius + 1] == 0).all()
    area, want = (painted == 255).sum(), (distance <= stroke.radius).sum()
    assert abs(area - want) < 0.02 * want


def test_strokes_paint_and_erase_in_order_over_the_brush() -> None:
    alpha = np.full((50, 100), 73, np.uint8)
    line = {"relativePoints": [0, 50, 100, 50], "relativeStrokeWidth": 10}
    touches = [
        {**line, "type": "add"},
        {**line, "type": "eraser", "relativeStrokeWidth": 4},
        {"type": "add", "relativePoints": [50, 50], "relativeStrokeWidth": 2},  # a dot
    ]
    painted = brush.paint_strokes(alpha, brush.strokes(touches, 100, 50))
    assert painted[0, 0] == 73 and painted[25 - 4, 20] == 255  # untouched; painted
    assert painted[25, 20] == 0 and painted[25, 50] == 255  # erased; the dot painted again
    assert alpha[25, 20] == 73  # the brush passed in is left as it was


def test_a_stroke_thinner_than_a_pixel_paints_at_most_its_pixels() -> None:
    """A fuzzer's find: Pillow refused the disc of a quarter-pixel stroke (a 500)."""
    thin = {"relativePoints": [0, 0, 50, 50], "relativeStrokeWidth": 10}
    painted = brush.paint_strokes(np.zeros((3, 2), np.uint8), brush.strokes([thin], 2, 3))
    assert painted[0, 0] == 255 and painted.sum() <= 3 * 255


@pytest.mark.parametrize(
    ("touches", "needle"),
    [
        ({"type": "add"}, "touches must be a list"),
        ([5], "touch 0 must be an object"),
        ([{"type": "lasso", "relativePoints": [1, 2]}], "type must be one of add, eraser"),
        ([{"relativePoints": [1, 2, 3]}], "x, y pairs"),
        ([{"relativePoints": []}], "x, y pairs"),
        ([{"relativePoints": "1,2"}], "relativePoints must be a list of numbers"),
        ([{"relativePoints": [1, True]}], "relativePoints must be a list of numbers"),
        ([{"relativePoints": [1, float("nan")]}], "finite"),
        ([{"relativePoints": [1, 1e300]}], "relativePoints must be in -100..200"),
        ([{"relativePoints": [1, 2], "relativeStrokeWidth": 0}], "relativeStrokeWidth must be"),
        ([{"relativePoints": [1, 2], "relativeStrokeWidth": 1e9}], "relativeStrokeWidth must be"),
    ],
)
def test_what_is_not_a_stroke_is_refused(touches: object, needle: str) -> None:
    with pytest.raises(BrushDecodeError, match=needle):
        brush.strokes(touches, 100, 100)


def test_the_cost_of_strokes_grows_with_their_size_and_stays_within_the_image() -> None:
    dot = {"relativePoints": [50, 50], "relativeStrokeWidth": 1}
    line = {"relativePoints": [40, 40, 60, 60], "relativeStrokeWidth": 1}
    huge = {"relativePoints": [50, 50], "relativeStrokeWidth": 200}
    cost = {
        name: brush.stroke_cost(brush.strokes([t], 1000, 1000), 1000, 1000)
        for name, t in (("dot", dot), ("line", line), ("huge", huge))
    }
    assert cost["dot"] < cost["line"] < cost["huge"]
    assert cost["huge"] <= 1000 * (1000 + brush.ROW_COST)  # one disc: the image at most
