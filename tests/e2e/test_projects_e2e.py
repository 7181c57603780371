"""Two projects of one backend against a real Label Studio 1.23.2, from no model at all.

The backend starts with no shared model. One project sorts photographs nobody here made
(scikit-image's ``lfw_subset``: faces and non-faces, and its bundled astronaut, coffee and
rocket photos) into "face" and "not face"; the other sorts scikit-image's chelsea, coffee and
rocket photos by what they show. Each gets its first version from class annotations through
Label Studio's Start Training, each project's predictions come from its own model, and a round
of brush corrections in one project leaves the other's predictions byte-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from processes import Loop, running_backend, wait_for
from skimage import data as skdata

from backend.brush import encode_rle
from backend.dataset_export import export_project
from backend.label_config import label_config_for
from backend.label_studio import LabelStudioAPI
from backend.rounds import make_round
from backend.settings import Settings

from .label_studio import LabelStudioServer

AUTH = ("annotator-bot", "e2e-secret")
FACES = ["face", "not face"]
THINGS = ["cat", "cup", "rocket"]
FACES_CONFIG = label_config_for([*FACES, "Other"])
THINGS_CONFIG = label_config_for(THINGS)
TRAINING_WAIT = 600  # seconds: two first models and a round, on a busy 2-core machine


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Loop]:
    env = {
        "ABN_TRAIN_AFTER": "1000",
        "ABN_FIRST_IMAGE_SIZE": "64",
        "ABN_FIRST_EPOCHS": "3",
        "ABN_FINETUNE_EPOCHS": "2",
        "ABN_SWAP_INTERVAL": "0.2",
        "ABN_GATE_ACCURACY_MARGIN": "1",
        "ABN_GATE_MAP_MARGIN": "1",
        "ABN_GATE_MIN_EVIDENCE": "1",  # rounds of a handful: the gate's statistics are test_round's
    }
    with running_backend(tmp_path, None, auth=AUTH, **env) as deployment:
        yield deployment


def save(pixels: np.ndarray, path: Path) -> Path:
    image = Image.fromarray(pixels)
    if image.width < 64:  # lfw_subset is 25x25: show it as a small photo would be
        image = image.resize((100, 100), Image.BILINEAR)
    image.convert("RGB").save(path)
    return path


def face_images(folder: Path) -> dict[Path, str]:
    lfw = (skdata.lfw_subset() * 255).astype(np.uint8)  # 100 faces, then 100 non-faces
    images = {save(lfw[i], folder / f"face{i}.png"): "face" for i in range(5)}
    images |= {save(lfw[100 + i], folder / f"other{i}.png"): "not face" for i in range(5)}
    images[save(skdata.astronaut(), folder / "astronaut.png")] = "face"
    images[save(skdata.coffee(), folder / "coffee.png")] = "not face"
    images[save(skdata.rocket(), folder / "rocket.png")] = "not face"
    return images


def thing_images(folder: Path) -> dict[Path, str]:
    images = {}
    for name, label in (("chelsea", "cat"), ("coffee", "cup"), ("rocket", "rocket")):
        pixels = getattr(skdata, name)()
        images[save(pixels, folder / f"{name}.png")] = label
        images[save(pixels[:, ::-1].copy(), folder / f"{name}-flipped.png")] = label
    return images


def choice(label: str) -> dict[str, Any]:
    return {"from_name": "class", "to_name": "image", "type": "choices",
            "value": {"choices": [label]}}  # fmt: skip


def connect(ls: LabelStudioServer, backend: Loop, title: str, config: str, images: dict) -> Any:
    """A project with its images uploaded and the backend connected; returns (pid, ml, tasks)."""
    pid = ls.create_project(title, config)["id"]
    tasks = {}
    for path, label in images.items():
        [task_id] = ls.upload_image(pid, path)
        tasks[task_id] = label
    ml = ls.connect_ml_backend(pid, backend.base, "ABN", basic_auth=AUTH)
    wait_for(
        lambda: any(h.get("headers", {}).get("Authorization") for h in ls.project_webhooks(pid)),
        30,
        "the webhook to carry the backend's auth header",
    )
    return pid, ml, tasks


def backend_predictions(backend: Loop, ls: LabelStudioServer, pid: int, config: str) -> list:
    """What the backend answers for every task of `pid` now, region ids left out."""
    tasks = [{"id": t["id"], "data": t["data"]} for t in ls.tasks(pid)]
    body = {"tasks": tasks, "project": f"{pid}.1700000000", "label_config": config}
    reply = requests.post(backend.base + "/predict", json=body, auth=AUTH, timeout=120)
    assert reply.status_code == 200, reply.text
    payload = reply.json()
    return [
        (e["model_version"], [{k: v for k, v in r.items() if k != "id"} for r in e["result"]])
        for e in payload["results"]
    ]


def test_two_projects_each_train_and_serve_their_own_model(
    label_studio: LabelStudioServer, backend: Loop, tmp_path: Path
) -> None:
    ls = label_studio
    backend.start("worker", "worker")
    faces_dir, things_dir = tmp_path / "faces", tmp_path / "things"
    faces_dir.mkdir()
    things_dir.mkdir()
    faces, faces_ml, face_tasks = connect(
        ls, backend, "Faces", FACES_CONFIG, face_images(faces_dir)
    )
    things, things_ml, thing_tasks = connect(
        ls, backend, "Things", THINGS_CONFIG, thing_images(things_dir)
    )

    # No model yet: Label Studio's predictions stay empty, and /status says why.
    ls.retrieve_predictions(faces)
    for task_id in face_tasks:
        assert all(not p["result"] for p in ls.predictions(task_id))
    status = backend.get(f"/status?project={faces}")["project"]
    assert status["model_version"] == f"p{faces}-untrained"
    assert "no model yet" in status["reason"]

    # Annotators give each task its class; Start Training trains each project's first model.
    annotations = {}
    for tasks in (face_tasks, thing_tasks):
        for task_id, label in tasks.items():
            annotations[task_id] = ls.create_annotation(task_id, [choice(label)])
    ls.train(faces_ml["id"])
    ls.train(things_ml["id"])
    for pid in (faces, things):
        wait_for(
            lambda pid=pid: backend.registry(str(pid)).current(),
            TRAINING_WAIT,
            f"p{pid}-v1: " + backend.log("worker"),
        )
        wait_for(
            lambda pid=pid: backend.everyone_serves(f"p{pid}-v1", str(pid)),
            60,
            f"the backend to serve p{pid}-v1",
        )
    assert backend.registry(str(faces)).current()["classes"] == FACES
    assert backend.registry(str(things)).current()["classes"] == THINGS
    first = backend.get(f"/status?project={things}")["last_jobs"][str(things)]
    assert first["status"] == "published" and first["first_model"]["class_counts"] == {
        "cat": 2,
        "cup": 2,
        "rocket": 2,
    }

    # Label Studio asks again: every task gets a map, a class of its own project, and a score.
    for pid, tasks, classes in ((faces, face_tasks, FACES), (things, thing_tasks, THINGS)):
        ls.retrieve_predictions(pid)
        for task_id in tasks:
            [prediction] = [p for p in ls.predictions(task_id) if p["result"]]
            assert prediction["model_version"] == f"p{pid}-v1"
            kinds = {r["type"]: r for r in prediction["result"]}
            assert set(kinds) == {"brushlabels", "choices", "textarea"}
            assert kinds["choices"]["value"]["choices"][0] in classes
            assert 0 < prediction["score"] <= 1

    # An active-learning round: a tab of the four least confident tasks, in that order.
    settings = Settings(model_dir=backend.model_dir)
    record = make_round(LabelStudioAPI(ls.url, ls.token), faces, "least-confident", 4, settings)
    view = ls.api("GET", f"/api/dm/views/{record.view_id}/")
    assert view["data"]["title"] == record.title and record.title.startswith("Round 1:")
    shown = ls.api(
        "GET", "/api/tasks/", params={"project": faces, "view": record.view_id, "fields": "all"}
    )["tasks"]
    assert [t["id"] for t in shown] == record.tasks and len(record.tasks) == 4  # its order
    scores = {
        t["id"]: next(p["score"] for p in t["predictions"] if p["model_version"] == f"p{faces}-v1")
        for t in ls.tasks(faces)
    }
    assert set(sorted(scores, key=lambda t: (scores[t], t))[:4]) == set(record.tasks)

    # A round of brush corrections in the faces project...
    before = backend_predictions(backend, ls, things, THINGS_CONFIG)
    for task_id, label in face_tasks.items():  # held-out tasks too: the gate needs their maps
        [prediction] = [p for p in ls.predictions(task_id) if p["result"]]
        brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
        width, height = brush["original_width"], brush["original_height"]
        alpha = np.zeros((height, width), dtype=np.uint8)
        alpha[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
        edited = {**brush, "origin": "prediction-changed",
                  "value": {**brush["value"], "rle": encode_rle(alpha)}}  # fmt: skip
        ls.update_annotation(annotations[task_id]["id"], [edited, choice(label)])
    ls.train(faces_ml["id"])
    wait_for(
        lambda: backend.registry(str(faces)).current()["version"] == f"p{faces}-v2",
        TRAINING_WAIT,
        f"p{faces}-v2: " + backend.log("worker"),
    )
    wait_for(lambda: backend.everyone_serves(f"p{faces}-v2", str(faces)), 60, "the swap")

    # ...leaves the other project's predictions byte-identical, and its lineage alone.
    assert backend_predictions(backend, ls, things, THINGS_CONFIG) == before
    assert [r["version"] for r in backend.registry(str(things)).versions()] == [f"p{things}-v1"]
    versions = backend.get("/versions")["versions"]
    assert sorted(versions) == sorted([f"p{faces}-v1", f"p{faces}-v2", f"p{things}-v1"])

    # The faces project as a dataset on disk, straight from Label Studio.
    out = tmp_path / "faces-dataset"
    summary = export_project(ls.url, faces, out, ls.token, Settings(model_dir=tmp_path / "x"))
    assert sum(summary.written.values()) == len(face_tasks) and summary.maps == len(face_tasks)
    written = sorted(p.parent.name for p in out.glob("*/*/*.png"))
    assert written == sorted(face_tasks.values())
