"""Corrections: brush to target, the durable store, and the registry."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.brush import encode_rle
from backend.corrections import (
    BrushTooLarge,
    CorrectionError,
    alpha_to_map,
    brush_alpha,
    correction_from_annotation,
)
from backend.label_config import default_targets
from model.maps import mask_to_map

CLASSES = ["cat", "dog", "fox"]
TARGETS = default_targets(CLASSES)


def brush(alpha: np.ndarray, origin: str = "prediction-changed", rid: str = "r1") -> dict:
    height, width = alpha.shape
    return {
        "id": rid,
        "from_name": TARGETS.brush,
        "to_name": TARGETS.image,
        "type": "brushlabels",
        "origin": origin,
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": encode_rle(alpha), "brushlabels": [TARGETS.label]},
    }


def choice(label: str) -> dict:
    return {
        "from_name": TARGETS.choices,
        "to_name": TARGETS.image,
        "type": "choices",
        "value": {"choices": [label]},
    }


def annotation(results: list[dict], aid: int = 7, updated_at: str = "2026-11-26T10:00:00Z"):
    return {"id": aid, "result": results, "updated_at": updated_at}


TASK = {
    "id": 3,
    "data": {"image": "/data/upload/1/a.png"},
    "predictions": [{"model_version": "v1"}],
}


def test_graded_brush_becomes_the_cell_average() -> None:
    # A 64x64 pre-annotation at level 146 (of 8 levels); the annotator painted the top-left
    # 32x32 quadrant (255) and erased the bottom-right one (0); the rest keeps its level.
    alpha = np.full((64, 64), 146, dtype=np.uint8)
    alpha[:32, :32] = 255
    alpha[32:, 32:] = 0
    c = correction_from_annotation("1", annotation([brush(alpha), choice("dog")]), TASK, TARGETS, 2)
    expected = np.array([[1.0, 146 / 255], [146 / 255, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(c.target, expected, rtol=1e-6)
    assert (c.label, c.edited, c.model_version, c.task_id) == ("dog", True, "v1", 3)


def test_brushes_of_one_label_merge_by_maximum() -> None:
    predicted = np.zeros((16, 16), dtype=np.uint8)
    predicted[:8] = 100
    manual = np.zeros((16, 16), dtype=np.uint8)
    manual[4:12, 8:] = 255
    alpha, edited = brush_alpha(
        [brush(predicted, "prediction", "a"), brush(manual, "manual", "b")], TARGETS
    )
    assert edited
    np.testing.assert_array_equal(alpha, np.maximum(predicted, manual))


def test_an_unedited_prediction_is_a_confirmation() -> None:
    alpha = np.full((8, 8), 73, dtype=np.uint8)
    c = correction_from_annotation(
        "1", annotation([brush(alpha, origin="prediction")]), TASK, TARGETS, 2
    )
    assert not c.edited and c.label is None


def test_bad_brushes_are_refused() -> None:
    good = brush(np.zeros((8, 8), dtype=np.uint8))
    corrupt = {**good, "value": {**good["value"], "rle": good["value"]["rle"][:3]}}
    with pytest.raises(CorrectionError, match="brush result 0"):
        correction_from_annotation("1", annotation([corrupt]), TASK, TARGETS, 2)
    wrong_size = {**good, "original_width": 9}
    with pytest.raises(CorrectionError, match="brush result 0"):
        correction_from_annotation("1", annotation([wrong_size]), TASK, TARGETS, 2)
    other = brush(np.zeros((4, 4), dtype=np.uint8), rid="x")
    with pytest.raises(CorrectionError, match="another brush of the same image"):
        correction_from_annotation("1", annotation([good, other]), TASK, TARGETS, 2)
    assert correction_from_annotation("1", annotation([]), TASK, TARGETS, 2) is None


def test_a_class_without_a_brush_is_a_label_alone() -> None:
    """A new project's annotation: what its first model learns from."""
    c = correction_from_annotation("1", annotation([choice("cat")]), TASK, TARGETS, 2)
    assert c is not None
    assert (c.label, c.target, c.edited) == ("cat", None, False)


def _reference_map(alpha: np.ndarray, size: int) -> np.ndarray:
    """mask_to_map in float64: what alpha_to_map must give (float32 sums drift on big masks)."""
    import torch.nn.functional as F

    values = torch.as_tensor(alpha, dtype=torch.float64)[None, None]
    if alpha.max() > 1:
        values = values / 255.0
    height, width = alpha.shape
    mode = "area" if height >= size and width >= size else "bilinear"
    extra = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(values, size=(size, size), mode=mode, **extra)[0, 0].numpy()


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    size=st.integers(1, 16),
    levels=st.sampled_from([(0, 1), (0, 255), (0, 73, 146, 255), tuple(range(256))]),
    seed=st.integers(0, 2**16),
)
def test_alpha_to_map_is_mask_to_map(
    shape: tuple[int, int], size: int, levels: tuple[int, ...], seed: int
) -> None:
    alpha = np.random.default_rng(seed).choice(np.array(levels, np.uint8), size=shape)
    got = alpha_to_map(alpha, size)
    assert got.dtype == np.float32 and got.shape == (size, size)
    np.testing.assert_allclose(got, _reference_map(alpha, size), rtol=1e-6, atol=1e-7)
    # mask_to_map itself computes in float32: its rounding, not a difference of method.
    np.testing.assert_allclose(got, mask_to_map(alpha, size).numpy(), rtol=1e-4, atol=1e-5)


def test_alpha_to_map_needs_no_copy_of_the_brush() -> None:
    """mask_to_map holds 9 bytes per pixel (float32 copy and clipped copy): 2.3 GB at 16384^2."""
    alpha = np.zeros((4096, 4096), np.uint8)
    alpha[:2048] = 200
    alpha[:, 1000:1100] = 255
    tracemalloc.start()
    try:
        target = alpha_to_map(alpha, 14)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < alpha.size // 20, f"{peak} bytes for a {alpha.size}-pixel brush"
    np.testing.assert_allclose(target, _reference_map(alpha, 14), rtol=1e-6)


def test_a_brush_over_the_limit_is_refused_before_decoding() -> None:
    big = {**brush(np.zeros((8, 8), dtype=np.uint8)), "original_width": 16384}
    big["original_height"] = 16384
    with pytest.raises(BrushTooLarge, match=r"16384x16384 \(268435456 pixels\), more than ABN_BR"):
        correction_from_annotation("1", annotation([big]), TASK, TARGETS, 2, max_pixels=10**6)
    assert BrushTooLarge.status == 413
    small = brush(np.zeros((8, 8), dtype=np.uint8))
    assert correction_from_annotation("1", annotation([small]), TASK, TARGETS, 2, max_pixels=64)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda a, t: a.update(result=[1]), "result 0 must be an object"),
        (lambda a, t: a["result"][0].update(original_width=float("inf")), "must be an integer"),
        (lambda a, t: a["result"][0].update(original_width="8"), "must be an integer"),
        (lambda a, t: a.update(updated_at={}), "updated_at must be a string"),
        (lambda a, t: t.update(data=["x"]), "task.data.image"),
        (
            lambda a, t: a["result"][0].update(value={"rle": None, "brushlabels": ["Attention"]}),
            "RLE must be a list",
        ),
        # Not refusals: what cannot be read is ignored, the brush is still stored.
        (lambda a, t: a["result"].append({**choice("dog"), "value": 5}), None),
        (lambda a, t: a["result"].append({**choice("dog"), "value": {"choices": 5}}), None),
        (lambda a, t: t.update(predictions=5), None),
        (lambda a, t: t.update(predictions=[{"model_version": {}}]), None),
        (lambda a, t: a["result"][0].update(value={"brushlabels": 5}), None),
    ],
)
def test_odd_annotations_are_refused_cleanly_or_read(change, error: str | None) -> None:
    """Called directly (the app checks bodies first), nothing is a TypeError or a crash."""
    ann = annotation([brush(np.full((8, 8), 200, dtype=np.uint8))])
    task = {**TASK, "data": dict(TASK["data"])}
    change(ann, task)
    if error is None:
        correction_from_annotation("1", ann, task, TARGETS, 2)
        return
    with pytest.raises(CorrectionError, match=error):
        correction_from_annotation("1", ann, task, TARGETS, 2)


def test_many_brushes_at_the_limit_are_refused_before_decoding(monkeypatch) -> None:
    """A thousand tiny uniform streams declaring the largest size would take minutes."""
    import backend.corrections as corrections

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded")

    one = brush(np.zeros((8, 8), dtype=np.uint8))
    many = [dict(one, id=f"r{i}") for i in range(corrections.MAX_BRUSHES_FACTOR + 1)]
    monkeypatch.setattr(corrections, "decode_rle", no_decoding)
    with pytest.raises(BrushTooLarge, match=r"9 attention brushes hold 576 pixels in all"):
        correction_from_annotation("1", annotation(many), TASK, TARGETS, 2, max_pixels=64)
    other = brush(np.zeros((4, 4), dtype=np.uint8), rid="x")
    with pytest.raises(CorrectionError, match="another brush of the same image"):
        correction_from_annotation("1", annotation([one, other]), TASK, TARGETS, 2)


def touch(points: list[float], width: float = 30.0, kind: str = "add") -> dict:
    """One stroke as a draft keeps it (the editor's Points: percent of the image)."""
    return {"type": kind, "relativePoints": points, "relativeStrokeWidth": width}


def drafted(alpha: np.ndarray | None, touches: list[dict], shape=(16, 16), **changes) -> dict:
    """A brush result as the editor autosaves it: the RLE it loaded, and the strokes since."""
    result = brush(np.zeros(shape, np.uint8) if alpha is None else alpha, **changes)
    if alpha is None:  # a region drawn since the task opened: strokes only
        del result["value"]["rle"]
    result["value"]["touches"] = touches
    return result


def test_a_drafts_strokes_are_painted_over_its_brush_before_the_merge() -> None:
    predicted = np.full((16, 16), 100, np.uint8)
    over_the_top = touch([0, 25, 100, 25])  # 30% of 16 px wide: rows 0..7 at the least
    erase_the_bottom = touch([0, 90, 100, 90], kind="eraser")
    new_region = drafted(None, [touch([75, 50, 75, 50], width=10)], rid="n", origin="manual")
    alpha, edited = brush_alpha(
        [drafted(predicted, [over_the_top, erase_the_bottom]), new_region], TARGETS
    )
    assert edited
    assert (alpha[1:6] == 255).all() and (alpha[15] == 0).all() and alpha[9, 2] == 100
    assert alpha[8, 12] == 255  # the new region's dot, merged by maximum
    assert alpha[8, 4] == 100


def test_a_drafts_strokes_over_the_limits_are_refused() -> None:
    """Counted from the points before anything is decoded or painted."""
    import backend.corrections as corrections

    many = drafted(None, [touch([50, 50] * (corrections.MAX_TOUCH_POINTS + 1))])
    with pytest.raises(BrushTooLarge, match=r"hold 50001 points in all, more than 50000"):
        brush_alpha([many], TARGETS, max_pixels=10**6)
    wide = drafted(None, [touch([50, 50] * 300, width=200)], shape=(100, 100))
    with pytest.raises(BrushTooLarge, match=r"would paint about \d+ pixels, more than 64 x ABN"):
        brush_alpha([wide], TARGETS, max_pixels=10**4)
    with pytest.raises(CorrectionError, match=r"brush result 0 \(r1\): touch 0: type must be"):
        brush_alpha([drafted(None, [touch([1, 2], kind="lasso")])], TARGETS)
