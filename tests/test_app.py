"""The HTTP protocol: routes, errors, auth, metrics, over the test client and real sockets."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
from conftest import CLASSES, TOKEN, FakeLabelStudio, png_bytes, serving
from flask import Flask
from label_studio_sdk.label_interface import LabelInterface
from processes import ROOT, free_port

from backend.app import create_app
from backend.brush import decode_rle, encode_rle
from backend.label_config import label_config_for
from backend.label_studio import LabelStudioConnection, WebhookAuthorizer
from backend.predictions import attention_alpha
from backend.serving import ServedModel
from backend.settings import Settings

CONFIG = label_config_for(CLASSES)
AUTH = ("ml", "s3cret")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def make_settings(tmp_path: Path, fake: FakeLabelStudio | None = None, **changes: Any) -> Settings:
    settings = Settings(
        model_dir=tmp_path,
        label_studio_url=fake.url if fake else None,
        label_studio_api_key=TOKEN if fake else None,
        batch_size=4,
        image_timeout=2.0,
    )
    return settings.replace(**changes)


@pytest.fixture
def app(tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel) -> Flask:
    return create_app(make_settings(tmp_path, fake_ls), served=served)


@pytest.fixture
def client(app: Flask):
    return app.test_client()


def post(client, path: str, body: Any, **kwargs: Any):
    return client.post(path, data=json.dumps(body), content_type="application/json", **kwargs)


def task(i: int, url: str | None) -> dict[str, Any]:
    return {
        "id": i,
        "data": {} if url is None else {"image": url},
        "annotations": [],
        "predictions": [],
    }


# ---------------------------------------------------------------------------- protocol


def test_health_is_json_with_the_version(client, served: ServedModel) -> None:
    reply = client.get("/health")
    assert reply.status_code == 200 and reply.is_json
    assert reply.json["status"] == "UP" and reply.json["model_version"] == served.version


def test_setup_accepts_a_matching_config(client, served: ServedModel) -> None:
    body = {
        "project": "3.1700000000",
        "schema": CONFIG,
        "hostname": "http://ls:8080",
        "access_token": "abc",
        "extra_params": None,
    }
    reply = post(client, "/setup", body)
    assert reply.status_code == 200
    assert reply.json == {"model_version": served.version}


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        (CONFIG.replace("Attention", "Focus"), 'no <Label value="Attention"/>'),
        ('<View><Image name="image" value="$image"/></View>', "<BrushLabels>"),
    ],
)
def test_setup_refuses_a_config_and_says_why(client, schema: str, needle: str) -> None:
    reply = post(client, "/setup", {"project": "1.1", "schema": schema})
    assert reply.status_code == 400
    assert needle in reply.json["error"]
    assert needle.replace("'", "?") in reply.status or needle in reply.status  # reason phrase


def test_predict_mixes_good_and_bad_tasks_in_order(
    client, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    for name, (w, h) in {"a": (40, 30), "b": (23, 31), "c": (64, 64)}.items():
        fake_ls.add(f"/data/upload/1/{name}.png", png_bytes(w, h))
    fake_ls.add("/data/upload/1/text.png", b"plain text")
    tasks = [
        task(1, "/data/upload/1/a.png"),
        task(2, "/data/upload/1/missing.png"),  # 404
        task(3, "/data/upload/1/b.png"),
        task(4, "/data/upload/1/text.png"),  # not an image
        task(5, None),  # no image field
        task(6, "http://169.254.169.254/x.png"),  # disallowed host
        task(7, "/data/upload/1/c.png"),
    ]
    reply = post(
        client,
        "/predict",
        {
            "tasks": tasks,
            "project": "1.1",
            "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None},
        },
    )
    assert reply.status_code == 200
    results = reply.json["results"]
    assert len(results) == len(tasks)
    li = LabelInterface(CONFIG)
    sizes = {0: (40, 30), 2: (23, 31), 6: (64, 64)}
    for i, entry in enumerate(results):
        assert entry["model_version"] == served.version
        assert li.validate_prediction(entry, return_errors=True) == []
        if i not in sizes:
            assert entry == {"result": [], "score": 0.0, "model_version": served.version}
            continue
        w, h = sizes[i]
        brush, choice, top3 = entry["result"]
        assert (brush["original_width"], brush["original_height"]) == (w, h)
        alpha = decode_rle(brush["value"]["rle"], h, w)
        assert alpha.shape == (h, w) and alpha.dtype == np.uint8
        assert 0 < entry["score"] <= 1 and brush["score"] == entry["score"]
        assert choice["value"]["choices"][0] in CLASSES
        assert len(top3["value"]["text"]) == 3
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'abn_prediction_errors_total{reason="missing"} 2.0' in metrics
    assert 'abn_prediction_errors_total{reason="not_image"} 1.0' in metrics
    assert 'abn_prediction_errors_total{reason="disallowed"} 1.0' in metrics
    assert f'abn_predictions_total{{model_version="{served.version}"}} 3.0' in metrics
    assert "abn_model_batch_size_count 2.0" in metrics  # 7 tasks, batch size 4: two batches


def test_predicted_brush_is_the_models_map(
    client, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    import io

    from PIL import Image

    data = png_bytes(37, 21)
    fake_ls.add("/data/upload/1/a.png", data)
    reply = post(
        client, "/predict", {"tasks": [task(1, "/data/upload/1/a.png")], "label_config": CONFIG}
    )
    brush = reply.json["results"][0]["result"][0]
    (expected,) = served.predict([Image.open(io.BytesIO(data)).convert("RGB")])
    decoded = decode_rle(brush["value"]["rle"], 21, 37)
    assert np.array_equal(decoded, attention_alpha(expected.attention, 37, 21, 8))


def test_the_brush_floor_setting_reaches_the_served_brush(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    import io

    from PIL import Image

    floor = 0.5
    app = create_app(make_settings(tmp_path, fake_ls, brush_floor=floor), served=served)
    data = png_bytes(37, 21)
    fake_ls.add("/data/upload/1/a.png", data)
    reply = post(
        app.test_client(),
        "/predict",
        {"tasks": [task(1, "/data/upload/1/a.png")], "label_config": CONFIG},
    )
    brush = reply.json["results"][0]["result"][0]
    (expected,) = served.predict([Image.open(io.BytesIO(data)).convert("RGB")])
    decoded = decode_rle(brush["value"]["rle"], 21, 37)
    assert np.array_equal(decoded, attention_alpha(expected.attention, 37, 21, 8, floor))
    assert not np.array_equal(decoded, attention_alpha(expected.attention, 37, 21, 8))


def test_predict_without_label_config_uses_the_generated_names(
    client, fake_ls: FakeLabelStudio
) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    reply = post(client, "/predict", {"tasks": [task(1, "/data/upload/1/a.png")]})
    assert [r["from_name"] for r in reply.json["results"][0]["result"]] == [
        "attention",
        "class",
        "top3",
    ]


def test_predict_follows_the_projects_names_and_data_key(client, fake_ls: FakeLabelStudio) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    config = (
        '<View><Image name="pic" value="$photo"/><BrushLabels name="brush" toName="pic">'
        '<Label value="Attention"/></BrushLabels><Choices name="label" toName="pic">'
        + "".join(f'<Choice value="{c}"/>' for c in CLASSES)
        + "</Choices></View>"
    )
    tasks = [{"id": 1, "data": {"photo": "/data/upload/1/a.png"}}]
    reply = post(client, "/predict", {"tasks": tasks, "label_config": config})
    result = reply.json["results"][0]["result"]
    assert [(r["from_name"], r["to_name"]) for r in result] == [("brush", "pic"), ("label", "pic")]
    assert (
        LabelInterface(config).validate_prediction(reply.json["results"][0], return_errors=True)
        == []
    )


def test_setup_hostname_and_token_are_used_for_images(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    client = create_app(make_settings(tmp_path), served=served).test_client()
    fake_ls.add("/data/upload/4/a.png", png_bytes())
    body = {"project": "4.1700", "schema": CONFIG, "hostname": fake_ls.url, "access_token": TOKEN}
    assert post(client, "/setup", body).status_code == 200
    reply = post(
        client,
        "/predict",
        {"tasks": [task(1, "/data/upload/4/a.png")], "project": "4.1700", "label_config": CONFIG},
    )
    assert reply.json["results"][0]["result"], "image should load through the /setup connection"
    assert fake_ls.requests[-1][2]["Authorization"] == f"Token {TOKEN}"


def test_webhook_acknowledges_every_action(app: Flask) -> None:
    client = app.test_client()
    for action in ("TASKS_CREATED", "PROJECT_UPDATED", "SOMETHING_NEW"):
        reply = post(client, "/webhook", {"action": action, "project": {"id": 1}})
        assert reply.status_code == 200
        assert reply.json == {"status": "ok", "action": action, "ignored": True}
    # No Redis in this app: a training request waits in the store until there is one.
    reply = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
    assert reply.json == {"status": "ok", "action": "START_TRAINING", "training": "deferred"}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'abn_webhooks_total{action="START_TRAINING"} 1.0' in metrics


def test_versions_and_status(client, served: ServedModel) -> None:
    versions = client.get("/versions").json
    assert versions["versions"] == [served.version] and versions["current"] == served.version
    status = client.get("/status").json
    assert status["model_version"] == served.version
    assert status["model"]["classes"] == CLASSES and status["model"]["arch"] == "resnet18"
    assert status["pid"] == os.getpid()


def test_metrics_are_prometheus_text(client) -> None:
    client.get("/health")
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    text = reply.get_data(as_text=True)
    assert 'abn_http_requests_total{method="GET",route="/health",status="200"} 1.0' in text
    assert 'abn_http_request_duration_seconds_count{route="/health"} 1.0' in text


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/predict", b"{not json", "malformed JSON"),
        ("/predict", b"", "empty"),
        ("/predict", b"[1, 2]", "must be a JSON object"),
        ("/predict", b'{"label_config": "x"}', "missing field 'tasks'"),
        ("/predict", b'{"tasks": {"a": 1}}', "'tasks' must be an array"),
        ("/predict", b'{"tasks": [1]}', "tasks[0] must be an object"),
        ("/predict", b'{"tasks": [{"id": 1}]}', "tasks[0].data must be an object"),
        ("/predict", b'{"tasks": [{"data": "x"}]}', "tasks[0].data must be an object"),
        ("/predict", b'{"tasks": [], "label_config": 5}', "'label_config' must be a string"),
        ("/predict", b'{"tasks": [], "project": [1]}', "'project' must be"),
        ("/predict", b'{"tasks": [], "label_config": "<View/>"}', "label config refused"),
        ("/setup", b"{}", "missing field 'schema'"),
        ("/setup", b'{"schema": 3}', "'schema' must be a string"),
        ("/setup", b'{"schema": true}', "'schema' must be a string"),
        ("/setup", b'{"schema": "<View"}', "not valid XML"),
        (
            "/setup",
            b'{"schema": "'
            + CONFIG.replace('"', '\\"').replace("\n", "").encode()
            + b'", "hostname": "ftp://x"}',
            "hostname must be",
        ),
        ("/setup", b'{"schema": "<View/>", "access_token": 5}', "'access_token' must be a string"),
        ("/webhook", b"null", "must be a JSON object"),
        ("/webhook", b'{"project": {}}', "missing field 'action'"),
        ("/webhook", b'{"action": 7}', "'action' must be a string"),
        ("/webhook", b"\xff\xfe", "malformed JSON"),
    ],
)
def test_bad_requests_get_400_with_a_message(client, path: str, body: bytes, needle: str) -> None:
    reply = client.post(path, data=body, content_type="application/json")
    assert reply.status_code == 400, reply.json
    assert reply.is_json and needle in reply.json["error"]


def test_deeply_nested_json_is_a_400_not_a_crash(client) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/predict", data=body).status_code == 400


def test_unknown_route_and_wrong_method_are_json(client) -> None:
    reply = client.get("/nope")
    assert reply.status_code == 404 and reply.is_json
    reply = client.get("/predict")
    assert reply.status_code == 405 and reply.is_json


def test_no_user_input_causes_a_500(client) -> None:
    bodies = [
        b"",
        b"0",
        b'"x"',
        b"{}",
        b'{"tasks": null}',
        b'{"tasks": [null]}',
        b'{"tasks": [{"data": {"image": 5}}]}',
        b'{"tasks": [{"data": {"image": ["x"]}}]}',
        b'{"tasks": [{"data": {"image": "s3://b/k"}}]}',
        b'{"schema": "<View>' + b"x" * 1000,
        b'{"tasks": [{"data": {"image": "/data/upload/1/\\u0000"}}]}',
        b"\x00\x01",
    ]
    for path in ("/predict", "/setup", "/webhook"):
        for body in bodies:
            reply = client.post(path, data=body)
            assert reply.status_code < 500, (path, body, reply.json)


# ---------------------------------------------------------------------------- hostile bodies
# Each reproducer got a 500 before (issue 8): an event Label Studio never sends again.


def brush_event(aid: int = 5, **annotation: Any) -> dict[str, Any]:
    """ANNOTATION_CREATED with a valid 1x1 attention brush and a class."""
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 1, "label_config": CONFIG},
        "annotation": {
            "id": aid,
            "result": [
                {
                    "id": "att",
                    "from_name": "attention",
                    "to_name": "image",
                    "type": "brushlabels",
                    "origin": "manual",
                    "original_width": 1,
                    "original_height": 1,
                    "value": {
                        "format": "rle",
                        "rle": encode_rle(np.full((1, 1), 255, np.uint8)),
                        "brushlabels": ["Attention"],
                    },
                },
                {"from_name": "class", "to_name": "image", "type": "choices", "value": {}},
            ],
            "updated_at": "2026-11-26T10:00:00Z",
            **annotation,
        },
        "task": {"id": 3, "data": {"image": "/data/upload/1/a.png"}, "predictions": []},
    }


def _set(body: dict, path: str, value: Any) -> dict:
    *parents, last = path.split(".")
    target: Any = body
    for step in parents:
        target = target[int(step)] if step.isdigit() else target[step]
    target[int(last) if last.isdigit() else last] = value
    return body


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("project.label_config", ["<View/>"], "project.label_config must be a string"),
        ("annotation.result", [1], "annotation.result[0] must be an object"),
        (
            "annotation.result.0.value.brushlabels",
            5,
            "annotation.result[0].value.brushlabels must be an array of strings",
        ),
        ("annotation.result.0.origin", [], "annotation.result[0].origin must be a string"),
        ("annotation.result.1.value", 5, "annotation.result[1].value must be an object"),
        ("annotation.result.1.value", {"choices": 5}, "annotation.result[1].value.choices must"),
        ("task.data", ["/data/upload/1/a.png"], "task.data must be an object"),
        ("task.predictions", 5, "task.predictions must be an array"),
        ("annotation.id", 2**63, "annotation.id must be an integer in 0..9223372036854775807"),
        ("annotation.updated_at", {}, "annotation.updated_at must be a string"),
        ("annotation.result.0.original_width", float("inf"), "result[0].original_width must be"),
    ],
)
def test_hostile_annotation_is_a_400_naming_the_field(
    client, path: str, value: Any, needle: str
) -> None:
    reply = client.post(
        "/webhook",
        data=json.dumps(_set(brush_event(), path, value)),  # inf is sent as Infinity
        content_type="application/json",
    )
    assert reply.status_code == 400, reply.get_data(as_text=True)
    assert needle in reply.json["error"]
    assert reply.json["error"] in reply.status  # the reason phrase Label Studio shows


def test_a_project_given_as_its_id_is_the_project(client) -> None:
    reply = post(client, "/webhook", {**brush_event(), "project": 1})
    assert reply.status_code == 200 and reply.json["stored"] is True


def test_a_later_update_with_a_bad_timestamp_is_a_400(client) -> None:
    assert post(client, "/webhook", brush_event()).status_code == 200
    reply = post(client, "/webhook", brush_event(updated_at=5))
    assert reply.status_code == 400
    assert "annotation.updated_at must be a string, got a number" in reply.json["error"]


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        (
            "/webhook",
            {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 2**63}]},
            "annotations[0].id must be an integer in 0..9223372036854775807",
        ),
        ("/predict", {"tasks": [{"id": 2**63, "data": {}}]}, "tasks[0].id must be an integer"),
        ("/predict", {"tasks": [{"id": True, "data": {}}]}, "tasks[0].id must be an integer"),
        ("/rollback", {"version": ""}, "field 'version' must be a version name"),
        ("/setup", {"schema": CONFIG, "project": ""}, "field 'project' must be an integer or"),
    ],
)
def test_ids_out_of_range_and_empty_names_are_400s(client, path: str, body: Any, needle: str):
    reply = post(client, path, body)
    assert reply.status_code == 400, reply.get_data(as_text=True)
    assert needle in reply.json["error"]


def test_a_brush_over_the_pixel_limit_is_refused_before_it_is_decoded(
    client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 277 KB webhook declaring a 16384x16384 brush cost +2.3 GB of memory to decode."""
    import backend.corrections

    def no_decoding(*args: Any) -> None:
        raise AssertionError("decoded a brush over the limit")

    monkeypatch.setattr(backend.corrections, "decode_rle", no_decoding)
    body = brush_event()
    _set(body, "annotation.result.0.original_width", 16384)
    _set(body, "annotation.result.0.original_height", 16384)
    reply = post(client, "/webhook", body)
    assert reply.status_code == 413
    assert "16384x16384" in reply.json["error"]
    assert "ABN_BRUSH_MAX_PIXELS=64000000" in reply.json["error"]


def test_the_brush_limit_is_a_setting(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    settings = make_settings(tmp_path, fake_ls, brush_max_pixels=99)
    client = create_app(settings, served=served).test_client()
    alpha = np.zeros((10, 10), np.uint8)
    body = _set(brush_event(), "annotation.result.0.value.rle", encode_rle(alpha))
    _set(body, "annotation.result.0.original_width", 10)
    _set(body, "annotation.result.0.original_height", 10)
    reply = post(client, "/webhook", body)
    assert reply.status_code == 413 and "ABN_BRUSH_MAX_PIXELS=99" in reply.json["error"]
    _set(body, "annotation.result.0.original_height", 9)  # 90 pixels: decoded, wrong size
    _set(body, "annotation.result.0.value.rle", encode_rle(alpha[:9]))
    assert post(client, "/webhook", body).status_code == 200


def test_too_many_tasks_in_one_predict_is_a_413(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    settings = make_settings(tmp_path, fake_ls, max_tasks_per_request=3)
    client = create_app(settings, served=served).test_client()
    reply = post(client, "/predict", {"tasks": [task(i, None) for i in range(4)]})
    assert reply.status_code == 413
    assert "4 tasks" in reply.json["error"]
    assert "ABN_MAX_TASKS_PER_REQUEST=3" in reply.json["error"]
    reply = post(client, "/predict", {"tasks": [task(i, None) for i in range(3)]})
    assert reply.status_code == 200 and len(reply.json["results"]) == 3


def test_failed_tasks_are_logged_once_per_request(
    client, fake_ls: FakeLabelStudio, caplog: pytest.LogCaptureFixture
) -> None:
    """480k tasks without an image wrote 43 MB of log, a line each; now one line a request."""
    fake_ls.add("/data/upload/1/text.png", b"plain text")
    tasks = [task(i, None) for i in range(200)] + [task(500, "/data/upload/1/text.png")]
    with caplog.at_level(logging.INFO, logger="backend"):
        reply = post(client, "/predict", {"tasks": tasks})
    assert reply.status_code == 200 and len(reply.json["results"]) == 201
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "201 of 201 tasks got no prediction (missing 200, not_image 1)" in lines[0]
    assert "task 0:" in lines[0] and "task 500:" in lines[0]


def test_metrics_labels_are_bounded(client) -> None:
    """Any method sent used to become a label value: /metrics grew without bound."""

    def hostile(count: int) -> str:
        for i in range(count):
            client.open("/health", method=f"BREW{i}")
            client.open(f"/nowhere/{i}", method=f"M{i}")
        return client.get("/metrics").get_data(as_text=True)

    hostile(1)  # and /metrics itself, counted once it has answered
    text = hostile(30)
    assert "BREW" not in text and "nowhere" not in text
    assert 'method="other",route="unmatched",status="405"' in text
    assert len(hostile(300)) < len(text) + 100  # only the counts changed


def test_status_and_rollback_show_no_absolute_paths(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    from backend.registry import ModelRegistry

    registry = ModelRegistry(tmp_path)
    first = registry.publish_file(tiny_checkpoint, reason="test")
    registry.publish_file(tiny_checkpoint, reason="test")
    settings = make_settings(tmp_path, fake_ls, checkpoint=tiny_checkpoint)
    app = create_app(settings)  # its own model: serving MODEL_DIR's current version
    try:
        client = app.test_client()
        status = client.get("/status")
        assert status.status_code == 200
        text = status.get_data(as_text=True)
        assert str(tmp_path) not in text and str(tiny_checkpoint.parent) not in text
        assert status.json["model"]["source"] == "versions/v2.pt"
        registry.checkpoint_path(first["version"]).write_bytes(b"garbage")
        reply = post(client, "/rollback", {"version": first["version"]})
        assert reply.status_code == 409
        assert str(tmp_path) not in reply.json["error"]
        assert "versions/v1.pt" in reply.json["error"]
    finally:
        app.extensions["abn"].loop.stop()


def test_path_scrubber() -> None:
    from backend.request_io import PathScrubber

    scrub = PathScrubber(Path("/srv/abn")).scrub
    assert scrub("/srv/abn/versions/v1.pt: truncated") == "versions/v1.pt: truncated"
    assert scrub({"a": ["see /home/me/models/tiny.pt."]}) == {"a": ["see tiny.pt."]}
    assert scrub("http://ls:8080/data/upload/1/a.png") == "http://ls:8080/data/upload/1/a.png"
    assert scrub(3) == 3


# ---------------------------------------------------------------------------- auth


@pytest.fixture
def auth_client(tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel):
    settings = make_settings(tmp_path, fake_ls, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    return create_app(settings, served=served).test_client()


ROUTES = [
    ("GET", "/health"),
    ("POST", "/setup"),
    ("POST", "/predict"),
    ("POST", "/webhook"),
    ("POST", "/train"),
    ("GET", "/versions"),
    ("GET", "/status"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("ml", "wrong"),
        basic("other", "s3cret"),
        {"Authorization": "Bearer s3cret"},
        basic("", ""),
    ],
)
def test_every_route_needs_basic_auth(auth_client, method: str, path: str, headers: dict) -> None:
    reply = auth_client.open(path, method=method, headers=headers, data=b"{}")
    assert reply.status_code == 401 and reply.is_json
    assert reply.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_right_credentials_pass(auth_client, method: str, path: str) -> None:
    body = {"schema": CONFIG, "tasks": [], "action": "PROJECT_UPDATED", "project": "1"}
    reply = auth_client.open(path, method=method, headers=basic(*AUTH), data=json.dumps(body))
    assert reply.status_code == 200


def test_webhook_authorizer_adds_the_header_to_the_backends_webhook(
    fake_ls: FakeLabelStudio,
) -> None:
    fake_ls.webhooks.extend(
        [
            {"id": 5, "project": 3, "url": "http://backend:9090/webhook/", "headers": {"X-A": "1"}},
            {"id": 6, "project": 3, "url": "http://other/webhook", "headers": {}},
            {"id": 7, "project": 4, "url": "http://backend:9090/webhook", "headers": {}},
        ]
    )
    header = basic(*AUTH)["Authorization"]
    auth = WebhookAuthorizer(header, attempts=3, delay=0.05)
    conn = LabelStudioConnection(fake_ls.url, TOKEN)
    assert auth.authorize(conn, "3", "http://backend:9090/webhook")
    assert fake_ls.patches == [(5, {"headers": {"X-A": "1", "Authorization": header}})]
    assert auth.authorize(conn, "3", "http://backend:9090/webhook")  # already done: no patch
    assert len(fake_ls.patches) == 1
    assert not auth.authorize(conn, "9", "http://backend:9090/webhook")


def test_setup_with_auth_patches_the_webhook_in_the_background(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    settings = make_settings(tmp_path, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    client = create_app(settings, served=served).test_client()
    body = {"project": "3.1700", "schema": CONFIG, "hostname": fake_ls.url, "access_token": TOKEN}
    assert post(client, "/setup", body, headers=basic(*AUTH)).status_code == 200
    # Label Studio creates the webhook only after the first /setup succeeded.
    fake_ls.webhooks.append(
        {"id": 9, "project": 3, "url": "http://localhost/webhook", "headers": {}}
    )
    deadline = time.monotonic() + 10
    while not fake_ls.patches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_ls.patches == [(9, {"headers": basic(*AUTH)})]


# ---------------------------------------------------------------------------- real sockets


@pytest.fixture
def live_server(app: Flask) -> Iterator[str]:
    with serving(app) as url:
        yield url


def test_real_http_predict_and_refusal_reason(live_server: str, fake_ls: FakeLabelStudio) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    reply = requests.post(
        f"{live_server}/predict",
        json={"tasks": [task(1, "/data/upload/1/a.png")], "label_config": CONFIG},
        timeout=30,
    )
    assert reply.status_code == 200 and len(reply.json()["results"][0]["result"]) == 3
    # Label Studio shows str(HTTPError) for a failed /setup: the reason must be in it.
    reply = requests.post(
        f"{live_server}/setup", json={"schema": CONFIG.replace("Attention", "X")}, timeout=10
    )
    with pytest.raises(requests.HTTPError) as err:
        reply.raise_for_status()
    assert 'no <Label value="Attention"/>' in str(err.value)
    reply = requests.post(f"{live_server}/predict", data=b"{oops", timeout=10)
    assert reply.status_code == 400 and "malformed JSON" in reply.json()["error"]


def test_a_body_over_the_limit_is_a_413_however_it_is_sent(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    """A chunked body (no Content-Length) over the limit got "400 malformed JSON"."""
    settings = make_settings(tmp_path, fake_ls, max_request_bytes=4096)
    body = json.dumps({"tasks": [task(i, None) for i in range(200)]}).encode()
    assert len(body) > 4096

    def chunks(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    with serving(create_app(settings, served=served)) as url:
        headers = {"Content-Type": "application/json"}
        for data in (chunks(body), body):  # chunked, then with a Content-Length
            reply = requests.post(f"{url}/predict", data=data, headers=headers, timeout=30)
            assert reply.status_code == 413, reply.text
            assert "ABN_MAX_REQUEST_BYTES=4096" in reply.json()["error"]
        small = json.dumps({"tasks": [task(1, None)]}).encode()
        reply = requests.post(f"{url}/predict", data=chunks(small), headers=headers, timeout=30)
        assert reply.status_code == 200 and len(reply.json()["results"]) == 1
        exact = small + b" " * (4096 - len(small))  # at the limit, not over it
        reply = requests.post(f"{url}/predict", data=chunks(exact), headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text


def test_model_is_loaded_once_per_process(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = ServedModel.from_checkpoint.__func__  # type: ignore[attr-defined]

    def counting(cls, *args: Any, **kwargs: Any) -> ServedModel:
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ServedModel, "from_checkpoint", classmethod(counting))
    settings = make_settings(tmp_path, fake_ls, checkpoint=tiny_checkpoint)
    client = create_app(settings).test_client()
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    for _ in range(3):
        post(client, "/predict", {"tasks": [task(1, "/data/upload/1/a.png")]})
    assert len(calls) == 1


def test_no_shared_model_serves_projects_nothing_and_says_why(tmp_path: Path) -> None:
    """A newcomer's backend: no model at all until a project trains its own."""
    client = create_app(make_settings(tmp_path)).test_client()
    assert client.get("/health").json["model_version"] is None
    setup = post(client, "/setup", {"project": "5.1700000000", "schema": CONFIG})
    assert setup.status_code == 200
    assert setup.json["model_version"] == "p5-untrained"
    assert "project 5 has no model yet" in setup.json["message"]
    body = {
        "tasks": [task(1, "/data/upload/5/a.png")] * 2,
        "project": "5.1",
        "label_config": CONFIG,
    }
    reply = post(client, "/predict", body)
    assert reply.status_code == 200
    assert (
        reply.json["results"] == [{"result": [], "score": 0.0, "model_version": "p5-untrained"}] * 2
    )
    assert "Start Training" in reply.json["message"]
    assert client.get("/versions").json == {"versions": [], "current": None, "records": []}
    status = client.get("/status?project=5").json
    assert status["project"]["model_version"] == "p5-untrained"
    assert status["project"]["reason"].startswith("project 5 has no model yet")


@pytest.mark.slow  # a real gunicorn
def test_gunicorn_serve_with_two_workers(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    """serve(): real gunicorn, two workers, auth, and /metrics summed over the workers."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(tmp_path),
        "LABEL_STUDIO_URL": fake_ls.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "BASIC_AUTH_USER": AUTH[0],
        "BASIC_AUTH_PASS": AUTH[1],
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    ckpt = str(tiny_checkpoint)
    code = f"from backend.server import serve; serve('127.0.0.1', {port}, {ckpt!r}, 2)"
    log_path = tmp_path / "gunicorn.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # a busy machine loads the model slowly
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if requests.get(f"{base}/health", auth=AUTH, timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or still loading
                pass
            assert time.monotonic() < deadline, "gunicorn did not come up"
            time.sleep(0.3)
        assert requests.get(f"{base}/health", timeout=5).status_code == 401
        fake_ls.add("/data/upload/1/a.png", png_bytes())
        pids = set()
        for _ in range(6):
            reply = requests.post(
                f"{base}/predict",
                auth=AUTH,
                timeout=60,
                json={"tasks": [task(1, "/data/upload/1/a.png")], "label_config": CONFIG},
            )
            assert reply.status_code == 200 and reply.json()["results"][0]["result"]
            pids.add(requests.get(f"{base}/status", auth=AUTH, timeout=5).json()["pid"])
        workers = {child.pid for child in psutil.Process(proc.pid).children()}
        assert len(workers) == 2
        metrics = requests.get(f"{base}/metrics", auth=AUTH, timeout=5).text
        line = next(
            m
            for m in metrics.splitlines()
            if m.startswith('abn_http_requests_total{method="POST",route="/predict"')
        )
        assert float(line.rsplit(" ", 1)[1]) == 6.0  # all six, whichever worker answered
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
    assert proc.returncode == 0, log_path.read_text()
    # Every answer came from one of the two workers (usually both answered; the sum above
    # covers them all).
    assert pids and pids <= workers


def test_settings_from_env() -> None:
    from backend.settings import SettingsError

    env = {
        "MODEL_DIR": "/srv/abn",
        "LABEL_STUDIO_URL": "http://ls:8080/",
        "LABEL_STUDIO_API_KEY": "k",
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "p",
        "ABN_CHECKPOINT": "/m.pt",
        "ABN_BRUSH_LEVELS": "16",
        "ABN_BATCH_SIZE": "12",
        "ABN_IMAGE_ALLOWED_HOSTS": "a.com, *.b.net:8443 ,",
        "ABN_IMAGE_CACHE": "0",
        "ABN_IMAGE_TIMEOUT": "2.5",
        "ABN_MAX_REQUEST_BYTES": "2048",
        "ABN_MAX_TASKS_PER_REQUEST": "50",
        "ABN_BRUSH_MAX_PIXELS": "1000000",
    }
    s = Settings.from_env(env)
    assert (s.max_request_bytes, s.max_tasks_per_request, s.brush_max_pixels) == (
        2048,
        50,
        1_000_000,
    )
    defaults = Settings.from_env({})
    assert (defaults.max_request_bytes, defaults.max_tasks_per_request) == (64 * 2**20, 1000)
    assert defaults.brush_max_pixels == defaults.image_max_pixels == 64_000_000
    assert s.model_dir == Path("/srv/abn") and s.label_studio_url == "http://ls:8080"
    assert s.auth_enabled and s.checkpoint == Path("/m.pt")
    assert (s.brush_levels, s.batch_size, s.image_timeout) == (16, 12, 2.5)
    assert s.image_allowed_hosts == ("a.com", "*.b.net:8443")
    assert s.resolved_image_cache_dir is None
    assert Settings.from_env({}).resolved_image_cache_dir == Path("runs/model_dir/cache/images")
    for bad, needle in [
        ({"ABN_BRUSH_LEVELS": "1"}, "ABN_BRUSH_LEVELS"),
        ({"ABN_BATCH_SIZE": "many"}, "ABN_BATCH_SIZE"),
        ({"BASIC_AUTH_USER": "u"}, "together"),
        ({"LABEL_STUDIO_URL": "ls:8080"}, "LABEL_STUDIO_URL"),
        ({"ABN_IMAGE_CACHE": "maybe"}, "ABN_IMAGE_CACHE"),
        ({"ABN_IMAGE_TIMEOUT": "-1"}, "ABN_IMAGE_TIMEOUT"),
        ({"ABN_BRUSH_MAX_PIXELS": str(2**28 + 1)}, "ABN_BRUSH_MAX_PIXELS"),
        ({"ABN_MAX_TASKS_PER_REQUEST": "0"}, "ABN_MAX_TASKS_PER_REQUEST"),
        ({"ABN_MAX_REQUEST_BYTES": "1k"}, "ABN_MAX_REQUEST_BYTES"),
    ]:
        with pytest.raises(SettingsError, match=needle):
            Settings.from_env(bad)


def test_a_published_version_wins_over_the_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from backend.registry import ModelRegistry, shared_model_path

    settings = make_settings(tmp_path, checkpoint=tiny_checkpoint)
    assert shared_model_path(settings) == tiny_checkpoint
    record = ModelRegistry(tmp_path).publish_file(tiny_checkpoint, reason="test")
    path = ModelRegistry(tmp_path).checkpoint_path(record["version"])
    assert shared_model_path(settings) == path
    client = create_app(settings).test_client()
    assert client.get("/versions").json["versions"] == [record["version"]]


def test_post_train_requests_training_like_the_webhook(app: Flask, client) -> None:
    """Label Studio's train() with the START_TRAINING webhook flag off: POST /train."""
    body = {"project": "4.1700000000", "annotations": [], "label_config": "<View/>", "params": {}}
    reply = post(client, "/train", body)
    assert reply.status_code == 200, reply.json
    assert reply.json["training"] == "deferred"  # no Redis here: it waits in the store
    store = app.extensions["abn"].loop.store
    assert store.pending_requests() == [("4", "START_TRAINING")]
    for bad, needle in [({}, "missing field 'project'"), ({"project": [4]}, "'project' must")]:
        reply = post(client, "/train", bad)
        assert reply.status_code == 400 and needle in reply.json["error"], reply.json


@pytest.mark.parametrize(
    "body",
    [
        b'{"tasks": [{"id": 1, "data": {"image": "\\ud800"}}]}',  # an escape without its pair
        b'{"tasks": [{"id": 1, "data": {"image": "\xed\xa0\x80"}}]}',  # a surrogate as UTF-8
    ],
)
def test_a_lone_surrogate_is_a_400_not_a_500(client, body: bytes) -> None:
    """Found by the fuzz: a lone surrogate reached SQLite and failed to encode (a 500)."""
    for path in ("/predict", "/webhook", "/setup"):
        reply = client.post(path, data=body, content_type="application/json")
        assert reply.status_code == 400 and "lone UTF-16 surrogate" in reply.json["error"]


def test_a_paired_surrogate_escape_is_text(client) -> None:
    body = b'{"tasks": [{"id": 1, "data": {"image": "/data/upload/1/\\ud83d\\ude00.png"}}]}'
    reply = client.post("/predict", data=body, content_type="application/json")
    assert reply.status_code == 200 and reply.json["results"][0]["result"] == []
