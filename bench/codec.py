"""Benchmark the brush RLE codec against the Label Studio SDK and label-studio-brush-rle-rs.

The backend sends every attention map to Label Studio as brush RLE and reads human edits back
the same way, so codec time is paid per task. This times encode and decode of a 1024x1024
graded map (a smooth attention map, bilinearly upsampled and quantised) and of a binary mask,
checks that all three implementations agree byte for byte, and prints a table.

Run: ``.venv/bin/python bench/codec.py [--size 1024] [--repeats 7] [--sdk-repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import label_studio_brush_rle_rs as brush_rs
import numpy as np
from label_studio_sdk.converter import brush as sdk_brush

from backend import brush

CASES = (("binary", 2), ("8 levels", 8), ("256 levels", 256))


def graded_map(size: int, levels: int, seed: int = 0) -> np.ndarray:
    """A (size, size) uint8 map like an upsampled attention map quantised to ``levels`` levels.

    A random 14x14 map (the attention resolution of a ResNet at 224 px) is upsampled
    bilinearly with half-pixel centres, normalised to 0..1, quantised and spread over 0..255.
    """
    small = np.random.default_rng(seed).random((14, 14))
    src = np.clip((np.arange(size) + 0.5) * 14 / size - 0.5, 0, 13)
    low = np.floor(src).astype(np.intp)
    high = np.minimum(low + 1, 13)
    frac = src - low
    rows = small[low] * (1 - frac)[:, None] + small[high] * frac[:, None]
    up = rows[:, low] * (1 - frac)[None, :] + rows[:, high] * frac[None, :]
    up = (up - up.min()) / (up.max() - up.min())
    quantised = np.minimum((up * levels).astype(np.int64), levels - 1)
    return np.ascontiguousarray(np.round(quantised * 255 / (levels - 1)).astype(np.uint8))


def _median_ms(func: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``func`` in milliseconds, after one untimed warm-up call."""
    func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rs_encode(alpha: np.ndarray) -> list[int]:
    """The rs package's equivalent of ``mask2rle``: it takes the RGBA bytes and returns bytes."""
    return list(brush_rs.encode_rle(np.repeat(alpha.ravel(), 4), 8, [3, 4, 8, 16]))


def _rs_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    """The rs package's decoder returns all RGBA bytes; readers take alpha."""
    return brush_rs.decode_rle(rle, False).reshape(height, width, 4)[:, :, 3]


def _sdk_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    """How Label Studio's converter reads a brush mask."""
    return sdk_brush.decode_rle(rle).reshape(height, width, 4)[:, :, 3]


def run_codec_benchmark(
    size: int = 1024, *, repeats: int = 7, sdk_repeats: int = 3
) -> list[dict[str, Any]]:
    """Time ours, the SDK and the rs package on each map; one row per map.

    Asserts that all three encoders produce the same list and all three decoders the input.
    """
    rows = []
    for name, levels in CASES:
        alpha = graded_map(size, levels)
        shape = alpha.shape
        rle = brush.encode_rle(alpha)
        assert rle == sdk_brush.mask2rle(alpha), f"{name}: encoding differs from the SDK"
        assert rle == _rs_encode(alpha), f"{name}: encoding differs from the rs package"
        for decode in (brush.decode_rle, _sdk_decode, _rs_decode):
            assert np.array_equal(decode(rle, *shape), alpha), f"{name}: {decode.__name__} differs"

        timings = {
            "encode_ours_ms": _median_ms(lambda a=alpha: brush.encode_rle(a), repeats),
            "encode_sdk_ms": _median_ms(lambda a=alpha: sdk_brush.mask2rle(a), sdk_repeats),
            "encode_rs_ms": _median_ms(lambda a=alpha: _rs_encode(a), repeats),
            "decode_ours_ms": _median_ms(lambda r=rle, s=shape: brush.decode_rle(r, *s), repeats),
            "decode_sdk_ms": _median_ms(lambda r=rle, s=shape: _sdk_decode(r, *s), sdk_repeats),
            "decode_rs_ms": _median_ms(lambda r=rle, s=shape: _rs_decode(r, *s), repeats),
        }
        flat = alpha.ravel()
        rows.append(
            {
                "map": name,
                "size": size,
                "runs": int(np.count_nonzero(flat[1:] != flat[:-1])) + 1,
                "rle_len": len(rle),
                **timings,
                **{
                    f"{direction}_{other}_ratio": timings[f"{direction}_{other}_ms"]
                    / timings[f"{direction}_ours_ms"]
                    for direction in ("encode", "decode")
                    for other in ("sdk", "rs")
                },
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render benchmark rows as a fixed-width table (times in ms, ratios as other/ours)."""
    header = (
        f"{'map':<11} {'runs':>7} {'RLE len':>8} | {'direction':<6} "
        f"{'ours':>8} {'SDK':>9} {'rs':>8} | {'SDK/ours':>8} {'rs/ours':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        for direction in ("encode", "decode"):
            lines.append(
                f"{row['map']:<11} {row['runs']:>7} {row['rle_len']:>8} | {direction:<6} "
                f"{row[f'{direction}_ours_ms']:>8.2f} {row[f'{direction}_sdk_ms']:>9.1f} "
                f"{row[f'{direction}_rs_ms']:>8.2f} | "
                f"{row[f'{direction}_sdk_ratio']:>7.1f}x {row[f'{direction}_rs_ratio']:>6.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="map side in pixels")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of ours and rs")
    parser.add_argument("--sdk-repeats", type=int, default=3, help="timed runs of the SDK")
    args = parser.parse_args(argv)
    rows = run_codec_benchmark(args.size, repeats=args.repeats, sdk_repeats=args.sdk_repeats)
    print(f"brush RLE codec, {args.size}x{args.size} maps, median wall time in ms")
    print(format_table(rows))


if __name__ == "__main__":
    main()
