"""Edited-map inference (paper section 3): what the network predicts when a human moves its gaze.

The perception branch is fed the human's map in place of the attention branch's own; the top-3
classes before and after show what the edit changed, as the authors' editor shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from PIL import Image

from model.abn import ABN
from model.checkpoint import CheckpointMeta

TOP_K = 3


@dataclass
class Explanation:
    """Top classes with their probabilities, and the map the perception branch used."""

    top: list[tuple[str, float]]
    attention: np.ndarray  # (h, w) in [0, 1]


@torch.inference_mode()
def explain(
    model: ABN,
    meta: CheckpointMeta,
    image: Image.Image,
    edited_map: torch.Tensor | None = None,
    k: int = TOP_K,
) -> Explanation:
    """Classify `image` with the model's own map, or with `edited_map` (h, w) in its place."""
    device = next(model.parameters()).device
    x = meta.transform()(image.convert("RGB"))
    attention = None if edited_map is None else edited_map.reshape(1, 1, *edited_map.shape[-2:])
    output = model(
        x[None].to(device), attention=None if attention is None else attention.to(device)
    )
    probs = output.perception_logits.float().softmax(1)[0].cpu()
    classes = meta.classes
    values, indices = probs.topk(min(k, len(classes)))
    top = [(classes[i], float(v)) for v, i in zip(values, indices, strict=True)]
    return Explanation(top, output.attention[0, 0].float().cpu().numpy())


def overlay(image: Image.Image, attention: np.ndarray, strength: float = 0.5) -> Image.Image:
    """The map as a heat map over the image, upsampled to the image's size."""
    rgb = image.convert("RGB")
    heat = Image.fromarray((np.clip(attention, 0, 1) * 255).astype(np.uint8)).resize(
        rgb.size, Image.BILINEAR
    )
    colours = matplotlib.colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
    blended = (1 - strength) * np.asarray(rgb) / 255.0 + strength * colours
    return Image.fromarray((blended * 255).astype(np.uint8))


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """Panels left to right, for comparing the model's map with an edited one."""
    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    canvas = Image.new("RGB", (width, height))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas
