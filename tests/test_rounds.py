"""backend/rounds.py: which tasks a round offers, and what is refused or left unmade.

Label Studio's API is played by conftest.py's fake host for reads (it answers no POST, which
is how "Label Studio fails while the tab is made" is tested); tests/e2e makes real tabs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import CLASSES, TOKEN, FakeLabelStudio

from backend.label_config import default_targets, label_config_for
from backend.label_studio import LabelStudioAPI, LabelStudioAPIError
from backend.registry import ModelRegistry
from backend.rounds import RoundError, candidates, make_round, one_round_at_a_time
from backend.settings import Settings

TARGETS = default_targets(CLASSES)


def task(tid: int, version: str, score: float, predicted: str, label: str | None = None) -> dict:
    def choice(name: str) -> dict[str, Any]:
        return {"from_name": "class", "to_name": "image", "type": "choices",
                "value": {"choices": [name]}}  # fmt: skip

    annotations = [{"id": tid, "result": [choice(label)]}] if label else []
    prediction = {"model_version": version, "score": score, "result": [choice(predicted)]}
    return {"id": tid, "data": {"image": f"/data/upload/4/{tid}.png"},
            "predictions": [prediction], "annotations": annotations}  # fmt: skip


def test_candidates_come_from_this_versions_predictions_and_skip_corrected_tasks() -> None:
    tasks = [
        task(1, "v1", 0.9, "cat", label="dog"),
        task(2, "v1", 0.3, "fox"),
        task(3, "v0", 0.1, "cat"),  # predicted by an older version only
        task(4, "v1", 0.5, "dog"),  # corrected for v1 already
    ]
    pool, left_out = candidates(tasks, TARGETS, "v1", corrected={4}, with_maps=False)
    assert [(c.task_id, c.score, c.predicted, c.labelled) for c in pool] == [
        (1, 0.9, "cat", "dog"),
        (2, 0.3, "fox", None),
    ]
    assert left_out == {"corrected for this version": 1, "no prediction by this version": 1}


def project_four(
    tmp_path: Path, fake_ls: FakeLabelStudio, checkpoint: Path
) -> tuple[Settings, LabelStudioAPI]:
    """Project 4 on the shared v1, its five tasks predicted by v1 on the fake host."""
    settings = Settings(model_dir=tmp_path)
    ModelRegistry(tmp_path).publish_file(checkpoint)
    config = label_config_for(CLASSES)
    fake_ls.add("/api/projects/4/", json.dumps({"id": 4, "label_config": config}).encode())
    tasks = [task(i, "v1", i / 10, "cat") for i in range(1, 6)]
    fake_ls.add("/api/tasks/", json.dumps({"tasks": tasks}).encode())
    return settings, LabelStudioAPI(fake_ls.url, TOKEN)


def test_a_project_without_a_model_gets_no_round(tmp_path: Path) -> None:
    api = LabelStudioAPI("http://127.0.0.1:9", TOKEN)  # never called
    with pytest.raises(RoundError, match="project 4 has no model yet"):
        make_round(api, 4, "least-confident", 5, Settings(model_dir=tmp_path))


def test_nothing_half_made_when_label_studio_fails_and_one_round_at_a_time(
    tmp_path: Path,
    fake_ls: FakeLabelStudio,
    tiny_checkpoint: Path,
) -> None:
    settings, api = project_four(tmp_path, fake_ls, tiny_checkpoint)
    with pytest.raises(LabelStudioAPIError, match="HTTP 501"):  # the fake answers no POST
        make_round(api, 4, "least-confident", 3, settings)
    assert list(settings.layout.rounds("4").glob("round-*.json")) == []
    with (
        one_round_at_a_time(settings.layout.rounds("4")),
        pytest.raises(RoundError, match="another round of this project"),
    ):
        make_round(api, 4, "least-confident", 3, settings)
    empty = [task(i, "v0", 0.5, "cat") for i in range(1, 3)]
    fake_ls.add("/api/tasks/", json.dumps({"tasks": empty}).encode())
    with pytest.raises(RoundError, match=r"no task to offer for v1 \(2 no prediction by this"):
        make_round(api, 4, "least-confident", 3, settings)


def test_a_round_is_a_tab_in_label_studios_order_and_a_failed_read_takes_it_back(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    settings, api = project_four(tmp_path, fake_ls, tiny_checkpoint)
    fake_ls.accept_views = True
    listed = [{"id": 2}, {"id": 1}, {"id": 3}]  # the tab's own order
    tab = "/api/tasks/?project=4&view={}&page_size=1000"
    fake_ls.add(tab.format(1), json.dumps({"tasks": listed}).encode())

    record = make_round(api, 4, "least-confident", 3, settings)

    [view] = fake_ls.views
    assert view["project"] == 4 and view["data"]["ordering"] == ["tasks:predictions_score"]
    assert [f["value"] for f in view["data"]["filters"]["items"]] == [1, 2, 3]
    assert (record.number, record.view_id, record.tasks) == (1, 1, [2, 1, 3])
    saved = json.loads((settings.layout.rounds("4") / "round-1.json").read_text())
    assert saved["tasks"] == [2, 1, 3] and saved["version"] == "v1"
    assert record.url == f"{fake_ls.url}/projects/4/data?tab=1"

    fake_ls.add(tab.format(2), b"boom", status=500)
    with pytest.raises(LabelStudioAPIError, match="HTTP 500"):
        make_round(api, 4, "least-confident", 3, settings)
    assert ("DELETE", "/api/dm/views/2/") in [(m, path) for m, path, _ in fake_ls.requests]
    rounds = sorted(p.name for p in settings.layout.rounds("4").glob("round-*.json"))
    assert rounds == ["round-1.json"]
