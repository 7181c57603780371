"""Human maps: every kind of knowledge ends as an (h, w) map in [0, 1] at the model's map size.

The paper takes maps from three sources (section 4.2): edits of the model's own map, bubbles
placed by many users (CUB) and specialists' segmentation masks (IDRiD). All three become the same
thing here, an array the size of the attention map, so fine-tuning does not care where it came
from. Reducing to the map size averages over each cell (area interpolation), so a thin stroke
counts in proportion to the area it covers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def map_size_for(image_size: int) -> int:
    """The attention map's side for a square input: the trunk's stride is 16."""
    return max(image_size // 16, 1)


def resize_map(values: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """An (H, W) array to (h, w) float32 by cell averaging; upsampling is bilinear."""
    size = (size, size) if isinstance(size, int) else size
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]
    if t.shape[-2] >= size[0] and t.shape[-1] >= size[1]:
        out = F.interpolate(t, size=size, mode="area")
    else:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out[0, 0]


def mask_to_map(mask: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """A mask of any size (bool, 0/1 or 0-255, as segmentation labels come) to a map in [0, 1]."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask must be a non-empty 2-D array, got shape {mask.shape}")
    values = mask.astype(np.float32)
    if mask.dtype != np.bool_ and values.max() > 1.0:
        values /= 255.0
    return resize_map(np.clip(values, 0.0, 1.0), size)


def load_map_image(path: str | Path, size: int | tuple[int, int]) -> torch.Tensor:
    """A grayscale map file (255 = attend, 0 = ignore; any size) at the model's map size."""
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"), dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read map image ({exc})") from exc
    return mask_to_map(gray, size)


def bubbles_to_map(
    bubbles: Iterable[tuple[float, float, float]],
    image_size: tuple[int, int],
    size: int | tuple[int, int],
) -> torch.Tensor:
    """Bubbles (x, y, radius in pixels) from many users to a map: a Gaussian kernel density.

    Each bubble is a Gaussian with its radius as standard deviation, evaluated on the image's
    pixel grid (width, height = `image_size`); the sum is reduced to the map size and then
    normalised to a peak of 1. An image without bubbles gives an all-zero map.
    """
    width, height = image_size
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
    density = np.zeros((height, width), dtype=np.float32)
    for x, y, radius in bubbles:
        if radius <= 0:
            raise ValueError(f"bubble at ({x}, {y}) has radius {radius}; it must be positive")
        density += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2.0 * radius**2))
    reduced = resize_map(density, size)
    peak = reduced.max()
    return reduced / peak if peak > 0 else reduced
