"""Corrections: brush to target, the durable store, and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.brush import encode_rle
from backend.corrections import (
    CorrectionError,
    CorrectionStore,
    brush_alpha,
    correction_from_annotation,
)
from backend.label_config import default_targets
from backend.registry import ModelRegistry, RegistryError
from model import build_abn
from model.checkpoint import CheckpointError, make_meta

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
    assert correction_from_annotation("1", annotation([choice("cat")]), TASK, TARGETS, 2) is None


def _correction(aid: int = 7, level: int = 200, updated: str = "2026-11-26T10:00:00Z"):
    alpha = np.full((8, 8), level, dtype=np.uint8)
    return correction_from_annotation(
        "1", annotation([brush(alpha)], aid, updated), TASK, TARGETS, 2
    )


def test_store_is_idempotent_ordered_and_durable(tmp_path: Path) -> None:
    store = CorrectionStore(tmp_path / "c.sqlite3")
    assert store.put(_correction())
    assert not store.put(_correction())  # the same event twice changes nothing
    assert store.untrained_count("1") == 1
    assert store.put(_correction(level=50, updated="2026-11-26T11:00:00Z"))  # an update
    assert not store.put(_correction(level=90, updated="2026-11-26T10:30:00Z"))  # a late, older one
    reopened = CorrectionStore(tmp_path / "c.sqlite3")  # a restart
    [kept] = reopened.corrections("1")
    np.testing.assert_allclose(kept.target, np.full((2, 2), 50 / 255), rtol=1e-6)
    assert reopened.delete("1", [7]) == 1
    assert reopened.corrections("1") == []
    assert not reopened.put(_correction(updated="2026-11-26T12:00:00Z"))  # no resurrection
    reopened.delete("1", [99])  # deleted before it was ever seen
    assert not reopened.put(_correction(aid=99))


def test_store_marks_trained_corrections(tmp_path: Path) -> None:
    store = CorrectionStore(tmp_path / "c.sqlite3")
    for aid in (1, 2, 3):
        store.put(_correction(aid=aid))
    store.mark_trained("1", [1, 2], "v2")
    assert store.untrained_count("1") == 1
    assert store.summary() == {"1": {"corrections": 3, "confirmations": 0, "untrained": 1}}


def _publish(registry: ModelRegistry, classes: list[str] = CLASSES) -> dict:
    model = build_abn("resnet18", len(classes))
    return registry.publish(model, make_meta("abn", "resnet18", classes, 64), annotation_ids=[1])


def test_registry_versions_rollback_and_refusals(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    assert registry.current() is None
    first, second = _publish(registry), _publish(registry)
    assert (first["version"], second["version"]) == ("v1", "v2")
    assert registry.current()["version"] == "v2"
    assert [r["version"] for r in registry.versions()] == ["v1", "v2"]
    assert registry.rollback("v1")["version"] == "v1"
    assert registry.current()["version"] == "v1"
    assert _publish(registry)["version"] == "v3"  # numbers never go back
    with pytest.raises(RegistryError, match="no published version 'v9'"):
        registry.rollback("v9")
    registry.checkpoint_path("v2").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        registry.rollback("v2")
    assert registry.current()["version"] == "v3"
    leftovers = [p for p in registry.versions_dir.iterdir() if p.suffix != ".pt"]
    assert leftovers == []


def test_registry_records_lineage(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    record = _publish(registry)
    assert record["annotation_ids"] == [1] and record["parent_version"] is None
    state = torch.load(registry.checkpoint_path("v1"), weights_only=True)
    assert state["meta"]["version"] == "v1"
