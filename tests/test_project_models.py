"""One backend, many projects: each served its own model, the shared one, or none yet.

Real Flask app over the test client; project models are real checkpoints published in real
registries under a temporary MODEL_DIR; images come from conftest.py's fake Label Studio host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import CLASSES, TOKEN, FakeLabelStudio, png_bytes
from flask import Flask

from backend.app import create_app
from backend.label_config import label_config_for
from backend.registry import ModelRegistry
from backend.services import EXTENSION, BackendServices
from backend.serving import ServedModel
from backend.settings import Settings
from model import build_abn
from model.checkpoint import make_meta

FRUIT = ["apple", "pear"]
SHARED_CONFIG = label_config_for(CLASSES)
FRUIT_CONFIG = label_config_for(FRUIT)


def publish(model_dir: Path, project: str, classes: list[str], seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    model = build_abn("resnet18", len(classes))
    meta = make_meta("abn", "resnet18", classes, 64)
    return ModelRegistry(model_dir, project).publish(model, meta, reason="test")["version"]


@pytest.fixture
def app(tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel) -> Flask:
    for project in ("3", "4", "5"):
        fake_ls.add(f"/data/upload/{project}/a.png", png_bytes(48, 40))
    settings = Settings(
        model_dir=tmp_path,
        label_studio_url=fake_ls.url,
        label_studio_api_key=TOKEN,
        max_project_models=2,
    )
    return create_app(settings, served=served)


def svc(app: Flask) -> BackendServices:
    return app.extensions[EXTENSION]


def post(client: Any, path: str, body: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json")


def predict(client: Any, project: str, config: str) -> dict[str, Any]:
    body = {
        "tasks": [{"id": 1, "data": {"image": f"/data/upload/{project}/a.png"}}],
        "project": f"{project}.1700000000",
        "label_config": config,
    }
    reply = post(client, "/predict", body)
    assert reply.status_code == 200, reply.json
    return reply.json


def without_ids(reply: dict[str, Any]) -> list[Any]:
    """The results with their random region ids left out: what must not change."""
    return [
        [{k: v for k, v in r.items() if k != "id"} for r in e["result"]] for e in reply["results"]
    ]


def test_each_project_is_answered_by_its_own_model(app: Flask, served: ServedModel) -> None:
    client = app.test_client()
    assert publish(svc(app).settings.model_dir, "3", FRUIT, seed=1) == "p3-v1"

    fruit = predict(client, "3", FRUIT_CONFIG)
    assert fruit["model_version"] == "p3-v1"
    choice = fruit["results"][0]["result"][1]["value"]["choices"][0]
    assert choice in FRUIT
    animals = predict(client, "4", SHARED_CONFIG)
    assert animals["model_version"] == served.version
    assert animals["results"][0]["result"][1]["value"]["choices"][0] in CLASSES
    setup = post(client, "/setup", {"project": "3.1", "schema": FRUIT_CONFIG}).json
    assert setup == {"model_version": "p3-v1"}

    # A new version of project 3 leaves project 4's predictions byte-identical.
    publish(svc(app).settings.model_dir, "3", FRUIT, seed=2)
    svc(app).models.check()
    assert predict(client, "3", FRUIT_CONFIG)["model_version"] == "p3-v2"
    again = predict(client, "4", SHARED_CONFIG)
    assert again["model_version"] == served.version
    assert without_ids(again) == without_ids(animals)


def test_a_changed_class_list_is_refused_with_what_changed(app: Flask) -> None:
    client = app.test_client()
    publish(svc(app).settings.model_dir, "3", FRUIT, seed=1)
    changed = label_config_for(["apple", "plum"])
    reply = post(client, "/setup", {"project": "3.1", "schema": changed})
    assert reply.status_code == 400
    error = reply.json["error"]
    assert "project 3's model p3-v1 knows the classes apple, pear" in error
    assert "added plum; removed pear" in error and "abn reset --project 3" in error
    body = {"tasks": [{"id": 1, "data": {"image": "x"}}], "project": "3.1", "label_config": changed}
    assert post(client, "/predict", body).status_code == 400
    # After a reset the project is a new one: no model until its next training.
    ModelRegistry(svc(app).settings.model_dir, "3").reset("classes changed")
    svc(app).models.check()
    fresh = post(client, "/setup", {"project": "3.1", "schema": changed}).json
    assert fresh["model_version"] == "p3-untrained" and "no model yet" in fresh["message"]


def test_versions_and_rollback_are_per_lineage(app: Flask, served: ServedModel) -> None:
    client = app.test_client()
    model_dir = svc(app).settings.model_dir
    ModelRegistry(model_dir).publish_file(served.snapshot.source)
    publish(model_dir, "3", FRUIT, seed=1)
    publish(model_dir, "3", FRUIT, seed=2)
    publish(model_dir, "5", ["x", "y"], seed=3)
    everything = client.get("/versions").json
    assert everything["versions"] == ["v1", "p3-v1", "p3-v2", "p5-v1"]
    three = client.get("/versions?project=3").json
    assert three["versions"] == ["p3-v1", "p3-v2"] and three["current"] == "p3-v2"
    assert client.get("/versions?project=..").status_code == 400
    reply = post(client, "/rollback", {"version": "p3-v1"})
    assert reply.status_code == 200 and reply.json["serving"] == "p3-v1"
    assert client.get("/versions?project=5").json["current"] == "p5-v1"
    assert post(client, "/rollback", {"version": "p9-v1"}).status_code == 404
    assert post(client, "/rollback", {"version": "../v1"}).status_code == 404
    status = client.get("/status?project=3").json
    assert status["project"]["model_version"] == "p3-v1" and status["project"]["own_model"]


def test_at_most_the_configured_number_of_project_models_stay_loaded(app: Flask) -> None:
    client = app.test_client()
    model_dir = svc(app).settings.model_dir
    for project in ("3", "4", "5"):
        publish(model_dir, project, FRUIT, seed=int(project))
        assert predict(client, project, FRUIT_CONFIG)["model_version"] == f"p{project}-v1"
    assert sorted(svc(app).models.loaded()) == ["4", "5"]  # 3 was the least recently used
    assert predict(client, "3", FRUIT_CONFIG)["model_version"] == "p3-v1"  # loads again
    assert sorted(svc(app).models.loaded()) == ["3", "5"]


def test_class_labels_of_a_new_project_are_stored_and_can_start_its_first_model(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    settings = Settings(model_dir=tmp_path, train_first_after=2)
    client = create_app(settings, served=served).test_client()

    def label(aid: int, choice: str) -> Any:
        result = [{"from_name": "class", "to_name": "image", "type": "choices",
                   "value": {"choices": [choice]}}]  # fmt: skip
        return post(client, "/webhook", {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": aid, "result": result},
            "task": {"id": aid, "data": {"image": f"/data/upload/6/{aid}.png"}},
            "project": {"id": 6, "label_config": FRUIT_CONFIG},
        })  # fmt: skip

    first = label(1, "apple")
    assert first.status_code == 200
    assert first.json["stored"] and first.json["labelled"] == 1 and "training" not in first.json
    second = label(2, "pear").json
    assert second["labelled"] == 2 and second["training"] == "deferred"  # no Redis here
    store = svc_of(client).loop.store
    assert [c.label for c in store.labelled("6")] == ["apple", "pear"]
    assert store.label_config("6") == FRUIT_CONFIG
    assert [p for p, _ in store.pending_requests()] == ["6"]
    nothing = post(client, "/webhook", {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 3, "result": []},
        "task": {"id": 3, "data": {"image": "/data/upload/6/3.png"}},
        "project": {"id": 6, "label_config": FRUIT_CONFIG},
    }).json  # fmt: skip
    assert nothing["stored"] is False and "neither" in nothing["reason"]


def svc_of(client: Any) -> BackendServices:
    return client.application.extensions[EXTENSION]


@pytest.mark.parametrize("project", ["../x", "..", ".", "", True, [1]])
def test_a_hostile_webhook_project_never_names_a_path(app: Flask, project: Any) -> None:
    client = app.test_client()
    reply = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": project}})
    assert reply.status_code == 400
    assert not (svc(app).settings.model_dir.parent / "x.json").exists()


def test_a_deleted_project_drops_its_waiting_training(tmp_path: Path, served: ServedModel) -> None:
    """Label Studio's PROJECT_DELETED (sent where an organisation webhook listens): nothing is
    left to train on, so a training request waiting for Redis goes; its models stay on disk."""
    client = create_app(Settings(model_dir=tmp_path), served=served).test_client()
    publish(tmp_path, "7", FRUIT, seed=1)
    reply = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 7}})
    assert reply.json["training"] == "deferred"  # no Redis here: it waits in the store
    store = svc_of(client).loop.store
    assert [p for p, _ in store.pending_requests()] == ["7"]
    gone = post(client, "/webhook", {"action": "PROJECT_DELETED", "project": {"id": 7}})
    assert gone.status_code == 200 and gone.json["forgotten"] is True
    assert store.pending_requests() == []
    assert ModelRegistry(tmp_path, "7").current()["version"] == "p7-v1"
