"""The model registry under MODEL_DIR: versions, lineage, rollback, first publication."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.registry import ModelRegistry, RegistryError
from model import build_abn
from model.checkpoint import CheckpointError, make_meta

CLASSES = ["cat", "dog", "fox"]


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


# ---------------------------------------------------------------------------- hostile annotations


def test_the_first_model_is_published_once(tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path)
    record, published = registry.publish_initial(tiny_checkpoint)
    assert published and record["version"] == "v1" and record["reason"] == "initial model"
    again, published = registry.publish_initial(tiny_checkpoint)
    assert not published and again["version"] == "v1"
    assert [r["version"] for r in registry.versions()] == ["v1"]
