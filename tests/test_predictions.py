"""Predictions as Label Studio results: brush round trip, class, top-3, score, validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, png_bytes
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.brush import decode_rle
from backend.label_config import check_config, label_config_for
from backend.predictions import (
    attention_alpha,
    empty_prediction,
    quantise,
    to_label_studio,
    top3_lines,
    upsample,
)
from backend.serving import Prediction, ServedModel, checkpoint_version


def fake_prediction(attention: np.ndarray, version: str = "v-test") -> Prediction:
    top = (("dog", 0.7), ("cat", 0.2), ("fox", 0.1))
    return Prediction("dog", 1, 0.7, top, attention.astype(np.float32), version)


def test_quantise_uses_evenly_spaced_levels() -> None:
    values = np.linspace(0, 1, 1001, dtype=np.float32)
    for levels in (2, 8, 256):
        alpha = quantise(values, levels)
        expected = {round(k * 255 / (levels - 1)) for k in range(levels)}
        assert set(np.unique(alpha).tolist()) == expected
        assert alpha[0] == 0 and alpha[-1] == 255
        assert np.all(np.diff(alpha.astype(int)) >= 0)  # monotone
    assert np.array_equal(quantise(values, 256), np.rint(values * 255).astype(np.uint8))


def test_quantise_clamps_and_checks_levels() -> None:
    assert quantise(np.array([-1.0, 2.0]), 8).tolist() == [0, 255]
    with pytest.raises(ValueError):
        quantise(np.zeros(3), 1)


@pytest.mark.parametrize(("width", "height"), [(33, 700), (7, 7), (1, 513), (600, 1)])
def test_the_alpha_is_computed_in_bands_exactly_as_the_whole_map(width: int, height: int) -> None:
    attention = np.random.default_rng(3).random((7, 7), dtype=np.float32)
    whole = quantise(upsample(attention, width, height), 8)
    assert np.array_equal(attention_alpha(attention, width, height, 8), whole)


def test_upsample_is_bilinear_with_half_pixel_centres() -> None:
    small = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    for height, width in ((23, 37), (64, 64), (1, 5), (4, 4), (300, 7)):
        up = upsample(small, width=width, height=height)
        assert up.shape == (height, width) and up.dtype == np.float32
        want = F.interpolate(
            torch.from_numpy(small)[None, None],
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        assert np.allclose(up, want, atol=1e-6)


@pytest.mark.parametrize(("width", "height", "levels"), [(37, 23, 8), (1, 1, 8), (64, 48, 256)])
def test_brush_decodes_to_the_upsampled_quantised_map(width: int, height: int, levels: int) -> None:
    attention = np.random.default_rng(width).random((4, 4)).astype(np.float32)
    config = label_config_for(CLASSES)
    entry = to_label_studio(
        fake_prediction(attention), width, height, check_config(config, CLASSES), levels
    )
    brush = entry["result"][0]
    assert brush["type"] == "brushlabels"
    assert (brush["original_width"], brush["original_height"]) == (width, height)
    decoded = decode_rle(brush["value"]["rle"], height, width)
    assert np.array_equal(decoded, attention_alpha(attention, width, height, levels))
    assert LabelInterface(config).validate_prediction(entry, return_errors=True) == []


def test_result_carries_class_top3_score_and_version() -> None:
    config = label_config_for(CLASSES)
    entry = to_label_studio(
        fake_prediction(np.full((4, 4), 0.5)), 20, 10, check_config(config, CLASSES)
    )
    brush, choice, top3 = entry["result"]
    assert entry["score"] == pytest.approx(0.7)
    assert entry["model_version"] == "v-test"
    assert brush["score"] == choice["score"] == top3["score"] == entry["score"]
    assert brush["value"]["brushlabels"] == ["Attention"]
    assert (brush["from_name"], brush["to_name"]) == ("attention", "image")
    assert choice["value"] == {"choices": ["dog"]}
    assert (choice["from_name"], choice["type"]) == ("class", "choices")
    assert top3["type"] == "textarea" and top3["readonly"] is True
    assert top3["value"]["text"] == ["1. dog  70.0%", "2. cat  20.0%", "3. fox  10.0%"]
    assert len({r["id"] for r in entry["result"]}) == 3


def test_config_without_textarea_gets_no_top3_result_but_still_validates() -> None:
    config = (
        '<View><Image name="img" value="$im"/>'
        '<BrushLabels name="b" toName="img"><Label value="Attention"/><Label value="Other"/>'
        '</BrushLabels><Choices name="c" toName="img"><Choice value="fox"/>'
        '<Choice value="dog"/><Choice value="cat"/></Choices></View>'
    )
    entry = to_label_studio(fake_prediction(np.zeros((4, 4))), 8, 8, check_config(config, CLASSES))
    assert [r["type"] for r in entry["result"]] == ["brushlabels", "choices"]
    assert [r["from_name"] for r in entry["result"]] == ["b", "c"]
    assert LabelInterface(config).validate_prediction(entry, return_errors=True) == []


def test_empty_prediction_validates() -> None:
    entry = empty_prediction("v1")
    assert entry == {"result": [], "score": 0.0, "model_version": "v1"}
    li = LabelInterface(label_config_for(CLASSES))
    assert li.validate_prediction(entry, return_errors=True) == []


def test_real_model_prediction_round_trips(served: ServedModel) -> None:
    image = Image.open(io.BytesIO(png_bytes(41, 29))).convert("RGB")
    (prediction,) = served.predict([image])
    assert prediction.attention.shape == (4, 4)
    assert prediction.label in CLASSES and prediction.label == prediction.top[0][0]
    assert [p for _, p in prediction.top] == sorted((p for _, p in prediction.top), reverse=True)
    assert prediction.score == pytest.approx(prediction.top[0][1])
    config = label_config_for(CLASSES)
    entry = to_label_studio(prediction, 41, 29, check_config(config, CLASSES))
    decoded = decode_rle(entry["result"][0]["value"]["rle"], 29, 41)
    assert np.array_equal(decoded, attention_alpha(prediction.attention, 41, 29, 8))
    assert entry["model_version"] == served.version
    assert top3_lines(prediction)[0].startswith(f"1. {prediction.label} ")
    assert LabelInterface(config).validate_prediction(entry, return_errors=True) == []


def test_batching_gives_the_same_answers_as_single_images(served: ServedModel) -> None:
    images = [
        Image.open(io.BytesIO(png_bytes(30 + i, 30, (20 * i, 100, 50)))).convert("RGB")
        for i in range(6)
    ]
    batched = served.predict(images)  # batch size 4: two batches
    single = [served.predict([img])[0] for img in images]
    for a, b in zip(batched, single, strict=True):
        assert a.label == b.label
        assert np.allclose(a.attention, b.attention, atol=1e-5)


def test_swap_is_atomic_per_request(served: ServedModel, tiny_checkpoint) -> None:
    from model import load_checkpoint

    snap = served.snapshot
    model, meta = load_checkpoint(tiny_checkpoint)
    old = served.swap("v-new", model, meta)
    try:
        assert served.version == "v-new"
        img = Image.new("RGB", (16, 16))
        assert served.predict([img], snapshot=snap)[0].version == snap.version
        assert served.predict([img])[0].version == "v-new"
    finally:
        served.swap(old.version, old.model, old.meta, source=old.source)
    assert served.version == snap.version


def test_plain_checkpoint_version_is_stable_and_content_derived(tiny_checkpoint, tmp_path) -> None:
    from model.checkpoint import read_checkpoint

    meta, _ = read_checkpoint(tiny_checkpoint)
    v = checkpoint_version(tiny_checkpoint, meta)
    assert v.startswith("abn-resnet18-") and len(v) == len("abn-resnet18-") + 8
    assert checkpoint_version(tiny_checkpoint, meta) == v
    assert checkpoint_version(tiny_checkpoint, meta.updated(version="v7")) == "v7"
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_checkpoint.read_bytes() + b"x")
    assert checkpoint_version(other, meta) != v


def test_swap_checkpoint_loads_warms_and_reports_the_source(
    served: ServedModel, tiny_checkpoint, tmp_path
) -> None:
    from model import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    path = save_checkpoint(tmp_path / "v9.pt", model, {**meta, "version": "v9"})
    old = served.swap_checkpoint(path)
    try:
        assert served.version == "v9" and served.info()["source"] == str(path)
    finally:
        served.swap(old.version, old.model, old.meta, source=old.source)
    assert served.info()["source"] == str(tiny_checkpoint)
