"""The `abn` commands that need no server: label-config and versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CLASSES

from backend.cli import main
from backend.label_config import check_config
from backend.registry import ModelRegistry


def test_label_config_for_a_checkpoint_is_accepted_by_setup(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["label-config", "--checkpoint", str(tiny_checkpoint)])
    config = capsys.readouterr().out
    assert check_config(config, CLASSES).brush == "attention"


def test_label_config_defaults_to_the_served_version(
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="no published version"):
        main(["label-config"])
    ModelRegistry(tmp_path).publish_file(tiny_checkpoint, reason="initial model")
    main(["label-config"])
    config = capsys.readouterr().out
    assert all(f'<Choice value="{c}"/>' in config for c in CLASSES)


def test_versions_lists_lineage_and_marks_the_current_one(
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    registry = ModelRegistry(tmp_path)
    registry.publish_file(tiny_checkpoint, reason="initial model")
    registry.publish_file(tiny_checkpoint, reason="round 1")
    registry.rollback("v1")
    main(["versions"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("*") and "v1" in lines[0] and "initial model" in lines[0]
    assert not lines[1].startswith("*") and "round 1" in lines[1]
    with pytest.raises(SystemExit, match="no published version 'v7'"):
        main(["rollback", "v7"])


def test_label_config_for_named_classes(capsys: pytest.CaptureFixture[str]) -> None:
    main(["label-config", "--classes", "cat, dog ,fox"])
    config = capsys.readouterr().out
    assert check_config(config, ["cat", "dog", "fox"]).choices == "class"
    for bad in ("cat,,dog", "cat,cat", ""):
        with pytest.raises(SystemExit, match="distinct, non-empty names"):
            main(["label-config", "--classes", bad])
