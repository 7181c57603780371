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
    assert all(
        f'<Choice value="{c}" hotkey="{k}"/>' in config for c, k in zip(CLASSES, "123", strict=True)
    )


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


def test_label_config_without_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    main(["label-config", "--classes", "cat,dog"])
    assert check_config(capsys.readouterr().out, ["cat", "dog"]).check == "check"
    main(["label-config", "--classes", "cat,dog", "--no-check"])
    out = capsys.readouterr().out
    assert "KeyPointLabels" not in out and check_config(out, ["cat", "dog"]).check is None


def test_label_config_for_named_classes(capsys: pytest.CaptureFixture[str]) -> None:
    main(["label-config", "--classes", "cat, dog ,fox"])
    config = capsys.readouterr().out
    assert check_config(config, ["cat", "dog", "fox"]).choices == "class"
    for bad in ("cat,,dog", "cat,cat", ""):
        with pytest.raises(SystemExit, match="distinct, non-empty names"):
            main(["label-config", "--classes", bad])


def test_project_lineages_from_the_command_line(
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    ModelRegistry(tmp_path).publish_file(tiny_checkpoint, reason="initial model")
    own = ModelRegistry(tmp_path, "12")
    own.publish_file(tiny_checkpoint, reason="first model")
    own.publish_file(tiny_checkpoint, reason="round 1")
    capsys.readouterr()
    main(["versions", "--project", "12"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["p12-v1", "*"]
    assert "p12-v2" in lines[1] and "round 1" in lines[1]
    main(["rollback", "p12-v1"])
    assert "now serving p12-v1" in capsys.readouterr().out
    assert own.current()["version"] == "p12-v1"
    assert ModelRegistry(tmp_path).current()["version"] == "v1"  # the shared model stays
    main(["label-config", "--project", "12"])
    config = capsys.readouterr().out
    assert all(
        f'<Choice value="{c}" hotkey="{k}"/>' in config for c, k in zip(CLASSES, "123", strict=True)
    )
    main(["reset", "--project", "12"])
    assert "serves nothing now (was p12-v1)" in capsys.readouterr().out
    assert own.current() is None
    with pytest.raises(SystemExit, match="project 12 has no published version"):
        main(["label-config", "--project", "12"])
    with pytest.raises(SystemExit, match="not a project key"):
        main(["reset", "--project", "../12"])


def test_run_publishes_only_what_it_is_given(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from backend.cli import ensure_shared
    from backend.settings import Settings

    settings = Settings(model_dir=tmp_path)
    assert ensure_shared(settings, None, demo=False) is None  # a newcomer: no demo training
    assert ModelRegistry(tmp_path).current() is None
    assert not settings.layout.demo_checkpoint.exists()
    # --demo reuses the demo model an earlier start trained (here: a file put in its place).
    settings.layout.demo_checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    record = ensure_shared(settings, None, demo=True)
    assert record["version"] == "v1" and record["source"] == str(settings.layout.demo_checkpoint)
    assert ensure_shared(settings, tiny_checkpoint, demo=False)["version"] == "v1"  # kept
