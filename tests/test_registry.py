"""The model registry under MODEL_DIR: versions, lineage, rollback, first publication."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.registry import (
    ModelRegistry,
    RegistryError,
    all_versions,
    lineage_of,
    version_number,
)
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


def test_each_project_has_a_lineage_of_its_own(tmp_path: Path) -> None:
    shared, three, twelve = (ModelRegistry(tmp_path, p) for p in (None, "3", "12"))
    _publish(shared)
    assert _publish(three)["version"] == "p3-v1"
    assert _publish(three)["version"] == "p3-v2"
    assert _publish(twelve, ["a", "b"])["version"] == "p12-v1"
    assert shared.current()["version"] == "v1"  # untouched by the projects' versions
    assert ModelRegistry.projects(tmp_path) == ["12", "3"]
    assert three.rollback("p3-v1")["version"] == "p3-v1"
    assert twelve.current()["version"] == "p12-v1"
    with pytest.raises(RegistryError, match="no published version 'p12-v1'"):
        three.rollback("p12-v1")  # another lineage's version
    assert ModelRegistry.of_version(tmp_path, "p12-v1").project == "12"
    assert ModelRegistry.of_version(tmp_path, "v1").project is None
    names = {r["version"]: r["current"] for r in all_versions(tmp_path)}
    assert names == {"v1": True, "p12-v1": True, "p3-v1": True, "p3-v2": False}


def test_a_fork_continues_its_parents_numbering(tmp_path: Path) -> None:
    model = build_abn("resnet18", 3)
    meta = make_meta("abn", "resnet18", CLASSES, 64, parent_version="v4")
    assert ModelRegistry(tmp_path, "3").publish(model, meta)["version"] == "p3-v5"


def test_a_reset_lineage_serves_nothing_and_keeps_numbering(tmp_path: Path) -> None:
    three = ModelRegistry(tmp_path, "3")
    _publish(three)
    assert three.reset("classes changed")["version"] == "p3-v1"
    assert three.current() is None
    assert three.reset("again") is None
    assert _publish(three, ["x", "y"])["version"] == "p3-v2"  # never a name seen before
    assert three.rollback("p3-v1")["classes"] == CLASSES


def test_version_names_say_their_lineage() -> None:
    assert (lineage_of("v3"), lineage_of("p12-v3"), lineage_of("pa-b-v1")) == (None, "12", "a-b")
    assert (version_number("p12-v30"), version_number("abn-resnet18-1234abcd")) == (30, 0)
    for bad in ("", "3", "p12", "v", "p-v1", "../v1"):
        with pytest.raises(RegistryError, match="not a version name"):
            lineage_of(bad)
