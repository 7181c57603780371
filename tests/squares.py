"""Images whose class a first model learns in seconds, and whose human map is known exactly.

Each is grey noise with one coloured square; the square's colour is the class and the square
is where a human would look. Used where a test needs rounds that really help or really harm
(`test_round.py`, `e2e/test_gate_e2e.py`)."""

from __future__ import annotations

import numpy as np
from PIL import Image

CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 230)]


def square_image(index: int, size: int) -> tuple[Image.Image, int, np.ndarray]:
    """Image `index` (the same every time): the picture, its class, the human map (255 on the
    square, 0 elsewhere)."""
    rng = np.random.default_rng(index)
    label = index % len(CLASSES)
    pixels = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
    side = size // 3
    x, y = rng.integers(0, size - side, 2)
    pixels[y : y + side, x : x + side] = COLOURS[label]
    human = np.zeros((size, size), np.uint8)
    human[y : y + side, x : x + side] = 255
    return Image.fromarray(pixels), label, human
