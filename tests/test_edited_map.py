"""model.edited_map: the top-3 the model gives when a human's map gates its perception branch,
and the worker recording it on the stored correction."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.corrections import Correction
from backend.store import LoopStore
from backend.training import record_edited_top3
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


def _edited(aid: int, target: np.ndarray | None, *, edited: bool = True) -> Correction:
    return Correction(
        project="5",
        annotation_id=aid,
        task_id=aid,
        image=f"/data/upload/5/{aid}.png",
        label="cat",
        target=target,
        edited=edited,
        model_version="v1",
    )


def test_the_store_keeps_the_top3_of_the_map_as_stored_now(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    first = np.full((4, 4), 0.25, np.float32)
    store.put(_edited(1, first))
    top = [("dog", 0.5), ("cat", 0.3), ("fox", 0.2)]
    assert store.record_edited_top3("5", 1, first, "v1", top)
    got = LoopStore(tmp_path / "c.sqlite3").edited_top3("5")  # durable
    assert got[1]["model_version"] == "v1"
    assert got[1]["top3"] == [["dog", 0.5], ["cat", 0.3], ["fox", 0.2]]
    # The annotator changes the map: the old top-3 no longer describes it, and one computed
    # for the old map (a round that read it before the change) is not kept.
    second = np.full((4, 4), 0.75, np.float32)
    store.put(dataclasses.replace(_edited(1, second), updated_at="2026-12-02T10:00:00Z"))
    assert store.edited_top3("5") == {}
    assert not store.record_edited_top3("5", 1, first, "v1", top)
    assert not store.record_edited_top3("5", 99, first, "v1", top)  # no such correction
    assert store.record_edited_top3("5", 1, second, "v1", top)
    store.delete("5", [1])
    assert store.edited_top3("5") == {}


def test_a_round_records_the_top3_with_each_edited_map(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the worker does before it fine-tunes: the served version's top-3 with the human's
    map, as predict_with_map gives it; confirmations get none, a map it cannot use is skipped."""
    model, meta = load_checkpoint(tiny_checkpoint)
    store = LoopStore(tmp_path / "c.sqlite3")
    left = np.zeros((4, 4), np.float32)
    left[:, :2] = 1.0
    bad = np.full((4, 4), np.nan, np.float32)
    corrections = [
        _edited(1, left),
        _edited(2, np.ones((4, 4), np.float32), edited=False),  # a confirmation
        _edited(3, bad),  # no finite map: refused by map_to_model_size
        _edited(4, None),  # a class alone
    ]
    for c in corrections:
        store.put(c)
    image = _image()
    x = meta.transform()(image)[None].repeat(4, 1, 1, 1)
    with caplog.at_level(logging.WARNING, logger="backend.training"):
        recorded = record_edited_top3(store, "5", model, meta, "v1", corrections, x)
    want = predict_with_map(model, meta, image, left).top
    assert list(recorded) == ["1"]
    assert [name for name, _ in recorded["1"]] == [name for name, _ in want]
    [(aid, kept)] = store.edited_top3("5").items()
    assert aid == 1 and kept["model_version"] == "v1"
    assert kept["top3"][0][1] == pytest.approx(want[0][1], abs=1e-5)
    assert "annotation 3: no top-3 with its map" in caplog.text
    # A second round computes nothing again for a map that already has its top-3.
    assert record_edited_top3(store, "5", model, meta, "v2", corrections, x) == {}
    assert store.edited_top3("5")[1]["model_version"] == "v1"
