"""model.edited_map: the top-3 the model gives when a human's map gates its perception branch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import load_checkpoint
from model.edited_map import map_to_model_size, predict_with_map


def _image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_edited_map_matches_forward_with_that_map(tiny_checkpoint: Path) -> None:
    model, meta = load_checkpoint(tiny_checkpoint)
    image = _image()
    edited = np.zeros((64, 64), dtype=np.uint8)
    edited[:, :32] = 255  # the left half, at the image's size
    got = predict_with_map(model, meta, image, edited)
    x = meta.transform()(image)[None]
    gate = torch.zeros(1, 1, 4, 4)
    gate[..., :2] = 1.0
    with torch.no_grad():
        want = model(x, attention=gate).perception_logits.softmax(1)[0]
    assert len(got.top) == 3
    assert got.label == meta.classes[int(want.argmax())]
    assert got.top[0][1] == pytest.approx(float(want.max()), abs=1e-5)
    np.testing.assert_allclose(got.attention, gate[0, 0].numpy())


def test_a_different_map_can_change_the_prediction(tiny_checkpoint: Path) -> None:
    model, meta = load_checkpoint(tiny_checkpoint)
    image = _image()
    ones = predict_with_map(model, meta, image, np.ones((4, 4), dtype=np.float32))
    zeros = predict_with_map(model, meta, image, np.zeros((4, 4), dtype=np.float32))
    assert ones.top != zeros.top  # the gate reaches the logits


def test_small_maps_are_upsampled_and_bad_maps_refused() -> None:
    assert map_to_model_size(np.full((2, 2), 0.5, dtype=np.float32), (4, 4)).shape == (1, 1, 4, 4)
    assert float(map_to_model_size(np.full((8, 8), 255, dtype=np.uint8), (4, 4)).max()) == 1.0
    with pytest.raises(ValueError, match="2-D"):
        map_to_model_size(np.zeros((3,)), (4, 4))
    with pytest.raises(ValueError, match="finite"):
        map_to_model_size(np.full((4, 4), np.nan), (4, 4))
