"""backend/rounds.py: which tasks a round offers, and what is refused or left unmade.

Label Studio's API is played by conftest.py's fake host for reads (it answers no POST, which
is how "Label Studio fails while the tab is made" is tested); tests/e2e makes real tabs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASSES, TOKEN, FakeLabelStudio
from PIL import Image

from backend.brush import encode_rle
from backend.corrections import Correction
from backend.label_config import default_targets, label_config_for
from backend.label_studio import LabelStudioAPI, LabelStudioAPIError
from backend.registry import Lineage, ModelRegistry, answering, choose_answering
from backend.rounds import (
    HeldOut,
    RoundError,
    candidates,
    make_round,
    one_round_at_a_time,
    read_rounds,
    refresh_rounds,
    write_round_report,
)
from backend.settings import Settings
from backend.store import LoopStore
from model import build_abn
from model.checkpoint import make_meta

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
    tmp_path: Path,
    fake_ls: FakeLabelStudio,
    tiny_checkpoint: Path,
    caplog: pytest.LogCaptureFixture,
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
    assert not record.in_strategy_order  # least-confident gave 1, 2, 3
    [warning] = [r.getMessage() for r in caplog.records if "another order" in r.getMessage()]
    assert "round 1 in another order than least-confident gave" in warning
    assert "model version None, which is not v1" in warning  # the fake's project names none
    saved = json.loads((settings.layout.rounds("4") / "round-1.json").read_text())
    assert saved["tasks"] == [2, 1, 3] and saved["version"] == "v1"
    assert record.url == f"{fake_ls.url}/projects/4/data?tab=1"

    fake_ls.add(tab.format(2), b"boom", status=500)
    with pytest.raises(LabelStudioAPIError, match="HTTP 500"):
        make_round(api, 4, "least-confident", 3, settings)
    assert ("DELETE", "/api/dm/views/2/") in [(m, path) for m, path, _ in fake_ls.requests]
    rounds = sorted(p.name for p in settings.layout.rounds("4").glob("round-*.json"))
    assert rounds == ["round-1.json"]


def test_a_project_of_other_classes_than_the_shared_model_has_no_model(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    settings, api = project_four(tmp_path, fake_ls, tiny_checkpoint)
    config = label_config_for(["apple", "pear"])
    fake_ls.add("/api/projects/4/", json.dumps({"id": 4, "label_config": config}).encode())
    with pytest.raises(RoundError) as refused:
        make_round(api, 4, "least-confident", 3, settings)
    assert str(refused.value).startswith(
        "project 4 has no model yet (its classes apple, pear are not those of the shared model "
        "v1: cat, dog, fox)"
    )
    read = [path for _, path, _ in fake_ls.requests]
    assert "/api/projects/4/" in read  # the classes come from Label Studio's config...
    assert not [path for path in read if path.startswith("/api/tasks/")]  # ...before any task


def test_one_rule_says_which_lineage_answers_a_project(tmp_path: Path) -> None:
    """backend/registry.py's rule, which rounds and serving (ProjectModels) both ask."""
    assert answering(tmp_path, "4", CLASSES).reason == "project 4 has no model yet"
    model = build_abn("resnet18", 2)
    ModelRegistry(tmp_path).publish(model, make_meta("abn", "resnet18", ["cat", "dog"], 64))
    shared = answering(tmp_path, "4", ["dog", "cat"])  # the same classes, in any order
    assert (shared.version, shared.own) == ("v1", False)
    assert answering(tmp_path, "4", None).version == "v1"  # classes not known: the shared one
    other = answering(tmp_path, "4", ["apple", "pear"])
    assert other.version is None and other.reason == (
        "project 4 has no model yet (its classes apple, pear are not those of the shared "
        "model v1: cat, dog)"
    )
    assert answering(tmp_path, "4", ["cat"]).version is None  # a subset is not enough
    own_meta = make_meta("abn", "resnet18", ["apple", "pear"], 64)
    ModelRegistry(tmp_path, "4").publish(model, own_meta)
    own = answering(tmp_path, "4", ["apple", "pear"])
    assert (own.version, own.own) == ("p4-v1", True)
    assert choose_answering("4", None, Lineage("v1", ("a",)), ("a",)).version == "v1"


def brush(origin: str) -> dict[str, Any]:
    alpha = np.zeros((4, 4), dtype=np.uint8)
    alpha[:2] = 255
    return {"from_name": TARGETS.brush, "to_name": "image", "type": "brushlabels",
            "original_width": 4, "original_height": 4, "origin": origin,
            "value": {"format": "rle", "rle": encode_rle(alpha),
                      "brushlabels": [TARGETS.label]}}  # fmt: skip


def annotated(tid: int, *annotations: dict[str, Any]) -> dict[str, Any]:
    return {**task(tid, "v1", 0.5, "cat"), "annotations": list(annotations)}


LATER = "2100-01-01T00:00:00.000000Z"  # after every round made here
EARLIER = "2000-01-01T00:00:00Z"  # before them


def test_refresh_reads_each_rounds_outcome_and_the_report_is_written_from_it(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    """The fake host stands in for Label Studio here because annotations must be dated before
    and after a round: Label Studio stamps them itself. The e2e test refreshes against the real
    one (submitted, corrected, lead_time)."""
    settings, api = project_four(tmp_path, fake_ls, tiny_checkpoint)
    folder = settings.layout.rounds("4")
    folder.mkdir(parents=True)
    now = time.time()
    old = {
        "project": 4,
        "strategy": "least-confident",
        "size": 3,
        "title": "",
        "url": "",
        "view_id": 1,
        "left_out": {},
    }  # fmt: skip (a record of before the outcome fields)
    records = [  # round 1 on v1 (trained since: published), round 2 on v1 (trained: refused),
        {**old, "number": 1, "version": "v1", "tasks": [1, 2, 3], "created_at": 1e9},
        {**old, "number": 2, "version": "v1", "tasks": [4], "created_at": now + 1e3},
        {**old, "number": 3, "version": "p4-v2", "tasks": [5], "created_at": now + 3e3},
    ]  # round 3 on p4-v2, not trained yet
    for record in records:
        (folder / f"round-{record['number']}.json").write_text(json.dumps(record))
    (folder / "round-9.json").write_text("{not json")  # unreadable: skipped, logged
    fake_ls.add("/api/tasks/", json.dumps({"tasks": [
        annotated(1, {"id": 11, "result": [brush("prediction-changed")], "lead_time": 3.0,
                      "updated_at": LATER},
                  {"id": 10, "result": [brush("manual")], "lead_time": 100.0,
                   "updated_at": EARLIER}),  # before the round: not its outcome
        annotated(2, {"id": 12, "result": [brush("prediction")], "lead_time": 1.5,
                      "created_at": LATER}),  # submitted as predicted: not a correction
        annotated(3, {"id": 13, "result": [], "was_cancelled": True, "updated_at": LATER}),
        annotated(6, {"id": 16, "result": [brush("manual")], "lead_time": 9.0,
                      "updated_at": LATER}),  # in no round
    ]}).encode())  # fmt: skip
    gate = {"before": {"accuracy": 0.5, "map_mse": 0.25, "count": 4},
            "after": {"accuracy": 0.75, "map_mse": 0.125, "count": 4}}  # fmt: skip
    meta = make_meta("abn", "resnet18", CLASSES, 64, parent_version="v1")
    ModelRegistry(tmp_path, "4").publish(build_abn("resnet18", 3), meta, gate=gate)
    refused = {"before": {"accuracy": 0.75, "map_mse": 0.125, "count": 5},
               "after": {"accuracy": 0.5, "map_mse": 0.5, "count": 5}}  # fmt: skip
    settings.layout.job_result("4").parent.mkdir(parents=True, exist_ok=True)
    settings.layout.job_result("4").write_text(json.dumps(
        {"status": "rejected", "parent_version": "v1", "started_at": now + 2e3, "gate": refused}
    ))  # fmt: skip

    first, second, third = refresh_rounds(api, 4, settings)

    assert (first.annotated, first.corrected, first.lead_time_s) == (2, 1, 4.5)
    assert (first.training, first.version_after) == ("published", "p4-v2")
    assert first.before == HeldOut(0.5, 0.25, 4) and first.after == HeldOut(0.75, 0.125, 4)
    assert (second.annotated, second.corrected, second.lead_time_s) == (0, 0, 0.0)
    assert (second.training, second.version_after) == ("rejected", None)
    assert second.before == HeldOut(0.75, 0.125, 5) and second.after == HeldOut(0.5, 0.5, 5)
    # Not trained yet: "before" is what p4-v2 was published with; no "after".
    assert (third.training, third.before, third.after) == (None, HeldOut(0.75, 0.125, 4), None)
    assert all(r.refreshed_at is not None and r.refreshed_at >= now for r in (first, third))
    assert read_rounds(settings, "4") == [first, second, third]  # rewritten as refreshed

    out = tmp_path / "report"
    report = write_round_report([first, second, third], out, 4)
    text = report.read_text()
    assert text.startswith("# Active-learning rounds of project 4\n")
    assert "| 1 | least-confident | 3 | 2 | 1 | 4.5 | v1 | published p4-v2 | 50.00 -> 75.00 " \
        "| 0.2500 -> 0.1250 |" in text  # fmt: skip
    assert "| 2 | least-confident | 1 | 0 | 0 | 0.0 | v1 | refused by the gate |" in text
    assert "| 3 | least-confident | 1 | 0 | 0 | 0.0 | p4-v2 | not yet | 75.00 -> - |" in text
    assert "| least-confident | 3 | 1 | 4.5 |" in text  # per strategy: rounds, corrected, time
    # Points: the first round's "before" at 0 corrections, then each trained round's "after".
    assert "| least-confident | 0 | 0 | 1 | 50.00 | 0.2500 |" in text
    assert "| least-confident | 1 | 1 | 1 | 75.00 | 0.1250 |" in text
    assert "| least-confident | 2 | 1 | 1 | 50.00 | 0.5000 |" in text
    for name in ("accuracy.png", "map_distance.png"):
        with Image.open(out / name) as plot:
            assert plot.format == "PNG"


def test_no_rounds_no_refresh_and_no_report(tmp_path: Path) -> None:
    api = LabelStudioAPI("http://127.0.0.1:9", TOKEN)  # never called
    settings = Settings(model_dir=tmp_path)
    assert refresh_rounds(api, 4, settings) == [] and read_rounds(settings, "4") == []
    with pytest.raises(RoundError, match="project 4 has no rounds yet"):
        write_round_report([], tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()


def test_a_map_disagreement_round_offers_the_map_unlike_the_corrected_ones(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    settings, api = project_four(tmp_path, fake_ls, tiny_checkpoint)
    fake_ls.accept_views = True
    top, bottom = np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4), dtype=np.uint8)
    top[:2], bottom[2:] = 255, 255

    def predicted(tid: int, alpha: np.ndarray) -> dict[str, Any]:
        shown = task(tid, "v1", 0.5, "cat")
        mask = {**brush("prediction"), "value": {"format": "rle", "rle": encode_rle(alpha),
                                                 "brushlabels": [TARGETS.label]}}  # fmt: skip
        shown["predictions"][0]["result"].append(mask)
        return shown

    tasks = [predicted(1, top), predicted(2, bottom), predicted(3, top)]
    fake_ls.add("/api/tasks/", json.dumps({"tasks": tasks}).encode())
    fake_ls.add("/api/tasks/?project=4&view=1&page_size=1000", b'{"tasks": [{"id": 2}]}')
    # An annotator said, on an earlier task, that a cat is looked at in the top half.
    LoopStore(settings.layout.corrections_db).put(
        Correction(
            "4",
            90,
            9,
            "/data/upload/4/9.png",
            "cat",
            top.astype(np.float32) / 255,
            edited=True,
            model_version="v1",
        )
    )
    record = make_round(api, 4, "map-disagreement", 1, settings)
    [view] = fake_ls.views
    assert [f["value"] for f in view["data"]["filters"]["items"]] == [2]
    assert record.tasks == [2] and record.strategy == "map-disagreement"
