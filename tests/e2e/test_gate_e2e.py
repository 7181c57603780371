"""The loop's gate against a real Label Studio 1.23.2: an honest round publishes and lifts
held-out accuracy, a round of scrambled classes is refused.

The gate runs with its real defaults (margins, sign tests, at least 5 held-out tasks). The
images are `tests/squares.py`'s: the colour of a square on grey noise is the class, and the
human map is the square. The project starts with no model: 36 or more tasks labelled with their
class give it a first model (4 epochs from scratch at 64 px) that never learnt blue, because
blue is labelled only on held-out tasks.

1. 12 blue squares corrected (class and brush) are a round: it is published, and the project's
   held-out tasks labelled before it are classified better.
2. 48 more tasks annotated with scrambled classes (each class named as the next one), with
   honest brushes: the round is refused, with the numbers, and the served version stays.

Each verdict reaches Label Studio as the project's verdict tab (backend/verdict.py): its title
says the outcome and numbers, and it holds the tasks new to the round.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from processes import Loop, running_backend, wait_for
from squares import CLASSES, square_image

from backend.brush import encode_rle
from backend.label_config import label_config_for
from backend.layout import ModelDirLayout
from model.round import is_held_out

from .label_studio import LabelStudioServer

AUTH = ("annotator-bot", "e2e-secret")
CONFIG = label_config_for(CLASSES)
SIZE = 96  # pixels a side of each image; the models see them at 64
HISTORY, HONEST, SCRAMBLED = 36, 12, 48
POOL = 150  # images for the history: labelled until enough of them are held out
BLUE = CLASSES.index("blue")
TRAINING_WAIT = 900  # seconds for one training on a busy 2-core machine


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Loop]:
    env = {
        "ABN_TRAIN_AFTER": "1000",
        "ABN_FIRST_IMAGE_SIZE": "64",
        "ABN_FIRST_EPOCHS": "4",
        "ABN_SWAP_INTERVAL": "0.2",
    }
    with running_backend(tmp_path, None, auth=AUTH, **env) as deployment:
        yield deployment


def choice(label: int) -> dict[str, Any]:
    return {"from_name": "class", "to_name": "image", "type": "choices",
            "value": {"choices": [CLASSES[label]]}}  # fmt: skip


def brush(human: np.ndarray) -> dict[str, Any]:
    height, width = human.shape
    return {
        "from_name": "attention",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_rle(human), "brushlabels": ["Attention"]},
    }


@dataclass(frozen=True)
class Tab:
    title: str
    tasks: set[int]


def verdict_tab(ls: LabelStudioServer, pid: int, view_id: int | None) -> Tab:
    """The project's Data Manager tab `view_id`, as Label Studio lists it, and its tasks."""
    assert view_id is not None
    [view] = [v for v in ls.api("GET", "/api/dm/views/", params={"project": pid})
              if v["id"] == view_id]  # fmt: skip
    listed = ls.api("GET", "/api/tasks/", params={"project": pid, "view": view_id,
                                                  "page_size": 1000})  # fmt: skip
    return Tab(view["data"]["title"], {t["id"] for t in listed["tasks"]})


def train_and_wait(ls: LabelStudioServer, backend: Loop, ml_id: int, pid: int) -> dict[str, Any]:
    """Press Start Training; the job record of the round it ran."""
    record_path = ModelDirLayout(backend.model_dir).job_result(str(pid))
    before = record_path.stat().st_mtime_ns if record_path.exists() else None

    def finished() -> dict[str, Any] | None:
        if not record_path.exists() or record_path.stat().st_mtime_ns == before:
            return None
        record = json.loads(record_path.read_text())
        done = "verdict_tab" in record or record.get("status") == "failed"
        return record if done else None  # written again once Label Studio was told

    ls.train(ml_id)
    return wait_for(finished, TRAINING_WAIT, "the training job: " + backend.log("worker"))


def test_an_honest_round_is_published_and_a_scrambled_one_refused(
    label_studio: LabelStudioServer, backend: Loop, tmp_path: Path
) -> None:
    ls = label_studio
    pid = ls.create_project("ABN gate e2e", CONFIG)["id"]
    folder = Path(ls.document_root) / f"abn-gate-{pid}"
    folder.mkdir(parents=True)
    images = {}
    for index in range(POOL + 3 * HONEST + SCRAMBLED):
        picture, label, human = square_image(index, SIZE)
        picture.save(folder / f"square{index:03d}.png")
        images[f"square{index:03d}.png"] = (index, label, human)
    ls.add_local_storage(pid, folder.name, r".*\.png")
    by_index = {}
    for task in ls.tasks(pid):
        name = task["data"]["image"].rsplit("/", 1)[-1]
        index, label, human = images[name]
        by_index[index] = (task["id"], label, human)
    assert len(by_index) == len(images)
    ml = ls.connect_ml_backend(pid, backend.base, "ABN", basic_auth=AUTH)
    wait_for(
        lambda: any(h.get("headers", {}).get("Authorization") for h in ls.project_webhooks(pid)),
        30,
        "the webhook to carry the backend's auth header",
    )
    backend.start("worker", "worker")

    # The project's history: classes alone, then its first model, which never learns blue:
    # blue squares are labelled only where they are held out (the tasks rounds are judged on,
    # which the first model neither trains nor validates on). Held-out tasks are chosen by a
    # hash of the task id, so label until 6 are held out, 2 of them blue.
    history, held, held_blue = set(), 0, 0
    for index in range(POOL):
        task_id, label, _ = by_index[index]
        out = is_held_out(task_id, 0.2)
        if label == BLUE and not out:
            continue
        history.add(ls.create_annotation(task_id, [choice(label)])["id"])
        held += out
        held_blue += out and label == BLUE
        if len(history) >= HISTORY and held >= 6 and held_blue >= 2:
            break
    assert held >= 6 and held_blue >= 2, f"{held} held out ({held_blue} blue) of {POOL} tasks"
    first = train_and_wait(ls, backend, ml["id"], pid)
    assert first["status"] == "published", first
    first_version = first["version"]

    # An honest round: 12 blue squares corrected, with their class and the square as the brush.
    honest_indices = [i for i in range(POOL, POOL + 3 * HONEST) if by_index[i][1] == BLUE]
    assert len(honest_indices) == HONEST
    for index in honest_indices:
        task_id, label, human = by_index[index]
        ls.create_annotation(task_id, [brush(human), choice(label)])
    honest = train_and_wait(ls, backend, ml["id"], pid)
    gate = honest["gate"]
    assert honest["status"] == "published", (honest.get("reasons"), gate)
    assert honest["parent_version"] == first_version
    # Judged on the held-out tasks labelled before the round, and better on them.
    judged = set(honest["judged_annotation_ids"])
    assert len(judged) >= 5 and judged <= history
    assert gate["after"]["accuracy"] > gate["before"]["accuracy"], gate
    assert gate["paired"]["fixed"] > gate["paired"]["broken"], gate
    published = honest["version"]
    wait_for(lambda: backend.everyone_serves(published, str(pid)), 30, "serving " + published)
    # The verdict reaches Label Studio as a Data Manager tab holding the round's new tasks.
    honest_tasks = {by_index[i][0] for i in honest_indices}
    tab = verdict_tab(ls, pid, honest["verdict_tab"])
    print("honest round:", tab.title)  # the numbers, for `pytest -s`
    assert tab.title.startswith(f"ABN: round published as {published}: held-out accuracy")
    assert tab.tasks == honest_tasks
    ls.api("DELETE", f"/api/dm/views/{honest['verdict_tab']}/")  # a manager closes it

    # A round of scrambled classes with honest brushes: refused, and the version stays.
    start = POOL + 3 * HONEST
    for index in range(start, start + SCRAMBLED):
        task_id, label, human = by_index[index]
        ls.create_annotation(task_id, [brush(human), choice((label + 1) % len(CLASSES))])
    scrambled = train_and_wait(ls, backend, ml["id"], pid)
    assert scrambled["status"] == "rejected", scrambled
    assert scrambled["parent_version"] == published
    assert any("accuracy fell" in reason for reason in scrambled["reasons"]), scrambled["reasons"]
    assert scrambled["gate"]["after"]["accuracy"] < scrambled["gate"]["before"]["accuracy"]
    new_ids = {a.annotation_id for a in backend.store().annotations(str(pid))
               if a.trained_in is None}  # fmt: skip
    assert len(new_ids) == SCRAMBLED and not set(scrambled["judged_annotation_ids"]) & new_ids
    assert backend.registry(str(pid)).current()["version"] == published
    assert backend.everyone_serves(published, str(pid))
    status = backend.get(f"/status?project={pid}")
    assert "accuracy fell" in json.dumps(status), status
    # A deleted verdict tab is made again, now with the refusal and the refused round's tasks.
    assert scrambled["verdict_tab"] != honest["verdict_tab"]
    tab = verdict_tab(ls, pid, scrambled["verdict_tab"])
    print("scrambled round:", tab.title)
    assert tab.title.startswith(f"ABN: round refused, {published} still serves: held-out accuracy")
    assert tab.tasks == {by_index[i][0] for i in range(start, start + SCRAMBLED)}
