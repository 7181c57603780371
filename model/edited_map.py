"""Predict with a map a human edited (paper section 3, Fig. 5): the new top-3.

The perception branch is gated by the edited map in place of the attention branch's own
(``ABN.forward(x, attention=...)``). A map at any size is resized to the model's map size
(area averaging when larger, bilinear when smaller, as a brush becomes a target), so a
caller may pass a brush at the image's size or a target already at the map's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.abn import ABN
from model.checkpoint import CheckpointMeta

TOP_K = 3


@dataclass(frozen=True)
class EditedPrediction:
    """The classes the model gives with a map, best first, and that map at the model's size."""

    top: list[tuple[str, float]]  # (class, probability), at most TOP_K entries
    attention: np.ndarray  # (h, w) float32 in [0, 1]: the map the perception branch used

    @property
    def label(self) -> str:
        return self.top[0][0]


def map_to_model_size(edited: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An (H, W) map in [0, 1] (or uint8 0..255) as a (1, 1, h, w) tensor at the model's size."""
    array = np.asarray(edited)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"an edited map must be a non-empty 2-D array, got shape {array.shape}")
    values = torch.from_numpy(array.astype(np.float32))
    if array.dtype == np.uint8:
        values = values / 255.0
    if not torch.isfinite(values).all():
        raise ValueError("an edited map must hold finite values")
    values = values.clamp(0.0, 1.0)[None, None]
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    if values.shape[-2] >= size[0] and values.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(values, size)
    return F.interpolate(values, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def predict_with_map(
    model: ABN, meta: CheckpointMeta, image: Image.Image, edited: np.ndarray, k: int = TOP_K
) -> EditedPrediction:
    """Classify `image` with `edited` gating the perception branch instead of the model's map."""
    x = meta.transform()(image.convert("RGB"))[None]
    return predict_input_with_map(model, meta.classes, x, edited, k)


@torch.inference_mode()
def predict_input_with_map(
    model: ABN, classes: list[str], x: torch.Tensor, edited: np.ndarray, k: int = TOP_K
) -> EditedPrediction:
    """:func:`predict_with_map` for an input already transformed, (1, 3, H, W): the worker has
    its images as tensors. The model is run in eval mode and left in the mode it was in."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        features = model.features(x.to(device))
        _, own = model.att(features)
        gate = map_to_model_size(edited, tuple(own.shape[-2:])).to(device)
        output = model.forward_features(features, gate)
    finally:
        model.train(was_training)
    probs = output.perception_logits.float().softmax(1)[0].cpu()
    values, indices = probs.topk(min(k, len(classes)))
    top = [(classes[i], float(v)) for v, i in zip(values, indices, strict=True)]
    return EditedPrediction(top, output.attention[0, 0].float().cpu().numpy())
