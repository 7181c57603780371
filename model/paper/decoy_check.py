"""decoy-digits diagnostics: does a network fall for the decoy patch?

The decoy's colour names a class; in TRAIN it is the true class for most images, in the test
split it is random. Splitting accuracy by whether the decoy names another class ("conflicting")
tells whether a network learnt the shortcut that the human maps are meant to correct: a network
that uses it is right much less often on conflicting images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from model.data import Sample
from model.paper.decoy_digits import CANVAS, COLOURS, PATCH

NAME = "decoy-digits"


def decoy_class(image: np.ndarray) -> int:
    """The class whose colour the brightest corner patch has (the noise is dark, the patch not)."""
    palette = np.array(COLOURS, dtype=np.float32)
    corners = [
        image[y : y + PATCH, x : x + PATCH].reshape(-1, 3).mean(0)
        for y in (0, CANVAS - PATCH)
        for x in (0, CANVAS - PATCH)
    ]
    patch = max(corners, key=lambda c: float(c.sum()))
    return int(np.argmin(((palette - patch) ** 2).sum(1)))


def conflicting(samples: Sequence[Sample], classes: Sequence[str]) -> np.ndarray:
    """Per sample: whether its decoy names a class other than its label."""
    flags = []
    for sample in samples:
        with Image.open(sample.image) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
        flags.append(decoy_class(pixels) != int(classes[sample.label]))
    return np.array(flags, dtype=bool)


def breakdown_lines(correct: dict[str, np.ndarray], flags: np.ndarray) -> list[str]:
    """A markdown table: top-1 on conflicting vs agreeing test images, per model."""
    lines = [
        "| Model | top-1, decoy names another class [%] | top-1, decoy names the label [%] |",
        "|---|---|---|",
    ]
    for name, right in correct.items():
        cells = [
            f"{100 * right[mask].mean():.2f} ({int(mask.sum())})" if mask.any() else "-"
            for mask in (flags, ~flags)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
