"""backend/dataset_export.py: a project exported to the on-disk dataset layout.

Label Studio's API is played by conftest.py's fake host (its project and export endpoints
answer the JSON a 1.23.2 server sends; tests/e2e runs the real one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TOKEN, FakeLabelStudio, png_bytes
from PIL import Image

from backend.brush import encode_rle
from backend.cli import main
from backend.dataset_export import ExportError, export_project
from backend.label_config import label_config_for
from backend.label_studio import LabelStudioAPIError
from backend.settings import Settings
from model.data import AttentionDataset, find_classes
from model.round import is_held_out

CONFIG = label_config_for(["apple", "pear", "Other"])


def task(tid: int, choice: str | None, brush: bool = False, **extra: Any) -> dict[str, Any]:
    result: list[dict[str, Any]] = []
    if choice:
        result.append(
            {"from_name": "class", "to_name": "image", "type": "choices",
             "value": {"choices": [choice]}}
        )  # fmt: skip
    if brush:
        alpha = np.zeros((30, 40), dtype=np.uint8)
        alpha[:, :20] = 255
        result.append(
            {"from_name": "attention", "to_name": "image", "type": "brushlabels",
             "original_width": 40, "original_height": 30,
             "value": {"format": "rle", "rle": encode_rle(alpha), "brushlabels": ["Attention"]}}
        )  # fmt: skip
    annotation = {"id": tid, "result": result, "updated_at": "2026-12-02T10:00:00Z", **extra}
    return {"id": tid, "project": 4, "data": {"image": f"/data/upload/4/{tid}.png"},
            "annotations": [annotation]}  # fmt: skip


def serve_project(fake: FakeLabelStudio, tasks: list[dict[str, Any]]) -> None:
    fake.add("/api/projects/4/", json.dumps({"id": 4, "label_config": CONFIG}).encode())
    fake.add("/api/projects/4/export?exportType=JSON", json.dumps(tasks).encode())
    for t in tasks:
        fake.add(f"/data/upload/4/{t['id']}.png", png_bytes(40, 30))


def test_a_project_becomes_a_dataset_the_offline_commands_read(
    tmp_path: Path, fake_ls: FakeLabelStudio
) -> None:
    tasks = [task(i, ["apple", "pear"][i % 2], brush=i < 6) for i in range(1, 21)]
    tasks += [task(30, "Other"), task(31, None), task(32, "apple", was_cancelled=True)]
    broken = task(33, "pear")
    tasks.append(broken)
    serve_project(fake_ls, tasks)
    fake_ls.add("/data/upload/4/33.png", b"not an image")
    out = tmp_path / "dataset"

    summary = export_project(fake_ls.url, 4, out, TOKEN, Settings(model_dir=tmp_path))

    assert summary.classes == ["apple", "pear"]
    assert sum(summary.written.values()) == 20 and summary.maps == 5
    assert summary.skipped == {"not a class": 1, "no class": 1, "no annotation": 1,
                               "image not_image": 1}  # fmt: skip
    for i in range(1, 21):
        split = "test" if is_held_out(i, 0.2) else "train"
        assert (out / split / ["apple", "pear"][i % 2] / f"{i}.png").is_file()
    assert find_classes(out) == ["apple", "pear"]
    train = AttentionDataset(out, "train", ["apple", "pear"], 32, [0.5] * 3, [0.5] * 3)
    assert train.has_maps()
    saved = next((out / "maps").rglob("*.png"))
    alpha = np.asarray(Image.open(saved))
    assert alpha.shape == (30, 40) and alpha[:, :20].min() == 255 and alpha[:, 20:].max() == 0


def test_a_refusing_label_studio_is_a_clear_error(tmp_path: Path, fake_ls: FakeLabelStudio) -> None:
    serve_project(fake_ls, [])
    with pytest.raises(LabelStudioAPIError, match="pass --token or set LABEL_STUDIO_API_KEY"):
        export_project(fake_ls.url, 4, tmp_path / "d", "wrong", Settings(model_dir=tmp_path))
    with pytest.raises(LabelStudioAPIError, match="HTTP 404"):
        export_project(fake_ls.url, 5, tmp_path / "d", TOKEN, Settings(model_dir=tmp_path))
    fake_ls.add("/api/projects/6/", json.dumps({"id": 6, "label_config": "<View/>"}).encode())
    with pytest.raises(ExportError, match="project 6: the label config has no <Image>"):
        export_project(fake_ls.url, 6, tmp_path / "d", TOKEN, Settings(model_dir=tmp_path))
    with pytest.raises(LabelStudioAPIError, match="cannot reach Label Studio"):
        export_project("http://127.0.0.1:9", 4, tmp_path / "d", TOKEN, Settings(model_dir=tmp_path))


def test_abn_dataset_prints_what_it_wrote(
    tmp_path: Path, fake_ls: FakeLabelStudio, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    serve_project(fake_ls, [task(1, "apple"), task(2, "pear")])
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    out = tmp_path / "d"
    main(["dataset", "--from-label-studio", fake_ls.url, "--project", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "classes apple, pear" in printed and "maps: 0" in printed
