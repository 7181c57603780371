"""Property-based fuzz of every POST route against the real app: no body gets a 500.

Label Studio never retries a webhook, so a 500 is a lost event; and a 4xx must say what is
wrong, since its message is all the sender sees. Bodies are mostly valid ones (what Label Studio
1.23.2 sends) with one to three mutations at random places: a value replaced by a hostile one
(wrong type, out of range, non-finite, huge, nested), a field removed or one added; the rest are
arbitrary JSON. About 10,500 bodies in all, derandomized so that CI always sends the same ones.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import CLASSES, TOKEN, FakeLabelStudio, png_bytes
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.brush import encode_rle
from backend.label_config import label_config_for
from backend.registry import ModelRegistry
from backend.serving import ServedModel
from backend.settings import Settings

CONFIG = label_config_for(CLASSES)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# ---------------------------------------------------------------------------- the app


@pytest.fixture
def fuzz_app(tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path) -> Iterator[Flask]:
    """The real app, with two published versions to roll back to, and its own model.

    Its own: its hot-swap follows this registry, and must not swap the session's model.
    """
    for name in ("a", "b"):
        fake_ls.add(f"/data/upload/1/{name}.png", png_bytes(24, 20))
    registry = ModelRegistry(tmp_path)
    registry.publish_file(tiny_checkpoint, reason="fuzz v1")
    registry.publish_file(tiny_checkpoint, reason="fuzz v2")
    settings = Settings(
        model_dir=tmp_path,
        label_studio_url=fake_ls.url,
        label_studio_api_key=TOKEN,
        batch_size=4,
        image_timeout=2.0,
        image_allowed_hosts=(urlsplit(fake_ls.url).netloc,),
        train_after=3,
    )
    served = ServedModel.from_checkpoint(registry.current_checkpoint(), batch_size=4)
    app = create_app(settings, served=served)
    yield app
    app.extensions["abn"].loop.stop()


class Sender:
    """Posts bodies and checks every reply; counts what came back."""

    def __init__(self, app: Flask) -> None:
        self.client = app.test_client()
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()

    def post(self, path: str, body: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
        reply = self.client.post(path, data=data, content_type="application/json")
        self.sent += 1
        self.statuses[reply.status_code] += 1
        text = reply.get_data(as_text=True)
        assert reply.status_code < 500, (
            f"{path} -> {reply.status_code} {text[:300]}\n{data[:2000]!r}"
        )
        if reply.status_code >= 400:
            assert reply.is_json, (path, reply.status_code, text[:300])
            error = reply.json.get("error")
            assert isinstance(error, str) and error, (path, text[:300])
            assert names_something(error), (path, error, data[:2000])
            self.errors[error[:120]] += 1


# Words a refusal names: the fields of the bodies, or what is wrong with the body as a whole.
NAMED = (
    "action",
    "annotation",
    "annotations",
    "task",
    "tasks",
    "project",
    "result",
    "value",
    "brush",
    "rle",
    "original_width",
    "original_height",
    "label_config",
    "label config",
    "schema",
    "hostname",
    "access_token",
    "version",
    "updated_at",
    "origin",
    "choices",
    "data",
    "predictions",
    "JSON",
    "body",
    "ABN_",
    "params",
    "context",
    "drafts",
    "touch",
    "map check",
)


def names_something(error: str) -> bool:
    return any(word in error for word in NAMED)


# ---------------------------------------------------------------------------- mutations

HOSTILE = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**400,
    1.5,
    -0.0,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    "x",
    "0",
    "7",
    "v1",
    "../../etc/passwd",
    "/data/upload/1/a.png",
    "a\x00b",
    "\ud800",
    "é" * 5,
    "x" * 5000,
    "2026-11-26T10:00:00Z",
    [],
    [1],
    [None],
    ["x"],
    [[]],
    [{}],
    {},
    {"id": 1},
    {"id": "1"},
    {"a": {"b": []}},
    {"choices": 5},
    {"brushlabels": "Attention"},
]

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(HOSTILE),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: the root, each key of an object, each item of an array."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:6]):
            found += paths(item, (*prefix, index))
    return found


def at(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def mutate(data: st.DataObject, body: Any, *, max_mutations: int = 3) -> Any:
    """One to `max_mutations` changes: replace, remove or add, each at a random place."""
    for _ in range(data.draw(st.integers(1, max_mutations), label="mutations")):
        places = paths(body)
        # Deep places are where the validation is thinnest: prefer them.
        place = data.draw(st.sampled_from(sorted(places, key=len, reverse=True)), label="place")
        kind = data.draw(st.sampled_from(["replace", "replace", "hostile", "remove", "add"]))
        # Copies: the drawn values share objects with HOSTILE, which later mutations would change.
        new = copy.deepcopy(data.draw(st.sampled_from(HOSTILE) if kind == "hostile" else JSON))
        if not place:
            body = new
            continue
        parent, key = at(body, place[:-1]), place[-1]
        if kind in ("hostile", "replace"):
            parent[key] = new
        elif kind == "remove":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12), label="new key")] = new
        else:
            parent.insert(key, new)
    return body


# ---------------------------------------------------------------------------- valid bodies


def brush_result(width: int, height: int, level: int, *, corrupt: str | None = None) -> dict:
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[: max(1, height // 2)] = level
    rle = encode_rle(alpha)
    declared = (width, height)
    if corrupt == "truncated":
        rle = rle[: max(1, len(rle) // 2)]
    elif corrupt == "size":
        declared = (width + 1, height)
    elif corrupt == "huge":
        declared = (16384, 16384)
    elif corrupt == "garbage":
        rle = [255] * len(rle)
    return {
        "id": "att",
        "from_name": "attention",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "prediction-changed",
        "original_width": declared[0],
        "original_height": declared[1],
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": ["Attention"]},
    }


@st.composite
def annotation_events(draw: st.DrawFn) -> dict:
    width, height = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    corrupt = draw(st.sampled_from([None, None, None, "truncated", "size", "huge", "garbage"]))
    results: list[Any] = [brush_result(width, height, draw(st.integers(0, 255)), corrupt=corrupt)]
    if draw(st.booleans()):
        choice = draw(st.sampled_from(CLASSES))
        results.append(
            {
                "id": "cls",
                "from_name": "class",
                "to_name": "image",
                "type": "choices",
                "origin": "prediction",
                "value": {"choices": [choice]},
            }
        )
    aid, tid = draw(st.integers(1, 40)), draw(st.integers(0, 40))
    project: Any = {"id": draw(st.integers(1, 3)), "title": "fuzz"}
    if draw(st.booleans()):
        project["label_config"] = CONFIG
    return {
        "action": draw(st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])),
        "annotation": {
            "id": aid,
            "task": tid,
            "result": results,
            "updated_at": draw(st.sampled_from(["2026-11-26T10:00:00Z", "2026-11-26T11:00:00Z"])),
            "completed_by": 1,
            "was_cancelled": False,
        },
        "task": {
            "id": tid,
            "data": {"image": "/data/upload/1/a.png"},
            "predictions": [{"model_version": "v1", "score": 0.5}],
        },
        "project": project,
    }


@st.composite
def webhook_bodies(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["annotation"] * 6 + ["deleted", "deleted", "training", "other"]))
    if kind == "annotation":
        return draw(annotation_events())
    project = {"id": draw(st.integers(1, 3))}
    if kind == "deleted":
        ids = draw(st.lists(st.integers(1, 40), max_size=4))
        return {
            "action": "ANNOTATIONS_DELETED",
            "annotations": [{"id": i} for i in ids],
            "project": project,
        }
    if kind == "training":
        return {"action": "START_TRAINING", "project": project}
    return {"action": draw(st.sampled_from(["TASKS_CREATED", "PROJECT_UPDATED", "X"])), "x": 1}


@st.composite
def predict_bodies(draw: st.DrawFn) -> dict:
    images = ["/data/upload/1/a.png", "/data/upload/1/b.png", "/data/upload/1/nope.png"]
    tasks = [
        {
            "id": draw(st.integers(0, 50)),
            "data": {"image": draw(st.sampled_from(images))},
            "annotations": [],
            "predictions": [],
            "meta": {},
        }
        for _ in range(draw(st.integers(0, 3)))
    ]
    body: dict[str, Any] = {"tasks": tasks, "project": "1.1700000000"}
    if draw(st.booleans()):
        body["label_config"] = CONFIG
    if draw(st.booleans()):
        body["params"] = {"login": None, "password": None, "context": None}
    if tasks and draw(st.booleans()):  # "check my map": a point, the task's drafted brush
        body["params"] = {"context": {"result": [CHECK_POINT]}}
        width, height = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        corrupt = draw(st.sampled_from([None, None, "truncated", "size", "huge", "garbage"]))
        drafted = brush_result(width, height, draw(st.integers(0, 255)), corrupt=corrupt)
        points = draw(st.lists(st.floats(-10, 110), min_size=2, max_size=8))
        drafted["value"]["touches"] = [{"type": "add", "relativePoints": points}]
        tasks[0]["drafts"] = [{"id": 1, "result": [drafted], "updated_at": "2026-01-01"}]
        del tasks[1:]
    return body


CHECK_POINT = {
    "id": "pt",
    "type": "keypointlabels",
    "from_name": "check",
    "to_name": "image",
    "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Check my map"]},
}


@st.composite
def setup_bodies(draw: st.DrawFn) -> dict:
    return {
        "project": draw(st.sampled_from(["1.1700000000", "2", 3])),
        "schema": CONFIG,
        "hostname": "http://127.0.0.1:9",
        "access_token": "abc",
        "model_version": draw(st.sampled_from([None, "v1"])),
        "extra_params": None,
    }


def fuzz(sender: Sender, path: str, valid: st.SearchStrategy, examples: int) -> Callable:
    @fuzz_settings(examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        body = copy.deepcopy(data.draw(valid, label="valid"))
        if data.draw(st.integers(0, 9), label="unmutated") > 0:
            body = mutate(data, body)
        sender.post(path, body)

    return run


# ---------------------------------------------------------------------------- the tests


def test_fuzz_webhook(fuzz_app: Flask) -> None:
    sender = Sender(fuzz_app)
    fuzz(sender, "/webhook", webhook_bodies(), 6000)()
    assert sender.sent >= 6000
    assert sender.statuses[200] > 500  # plenty of valid events got through


def test_fuzz_predict(fuzz_app: Flask) -> None:
    sender = Sender(fuzz_app)
    fuzz(sender, "/predict", predict_bodies(), 1500)()
    assert sender.sent >= 1500
    assert sender.statuses[200] > 100


def test_fuzz_setup(fuzz_app: Flask) -> None:
    sender = Sender(fuzz_app)
    fuzz(sender, "/setup", setup_bodies(), 1500)()
    assert sender.sent >= 1500
    assert sender.statuses[200] > 100


def test_fuzz_rollback(fuzz_app: Flask) -> None:
    sender = Sender(fuzz_app)
    versions = st.sampled_from([{"version": "v1"}, {"version": "v2"}, {"version": "v3", "x": 1}])
    fuzz(sender, "/rollback", versions, 1000)()
    assert sender.sent >= 1000


def test_fuzz_train(fuzz_app: Flask) -> None:
    sender = Sender(fuzz_app)
    bodies = st.sampled_from(
        [
            {"project": "1.1700000000", "annotations": [], "label_config": "<View/>"},
            {"project": 2, "params": {"login": None, "password": None}},
        ]
    )
    fuzz(sender, "/train", bodies, 500)()
    assert sender.sent >= 500
    assert sender.statuses[200] > 50


def test_fuzz_arbitrary_json_and_bytes(fuzz_app: Flask) -> None:
    sender = Sender(fuzz_app)
    routes = st.sampled_from(["/webhook", "/predict", "/setup", "/rollback", "/train"])

    @fuzz_settings(500)
    @given(route=routes, body=JSON, raw=st.none() | st.binary(max_size=64))
    def run(route: str, body: Any, raw: bytes | None) -> None:
        sender.post(route, body, raw=raw)

    run()
    assert sender.sent >= 500


def test_fuzz_project_queries(fuzz_app: Flask) -> None:
    """?project= on /versions and /status: any text is a 200 or a 400 that names the project."""
    client = fuzz_app.test_client()
    statuses: Counter[int] = Counter()

    @fuzz_settings(400)
    @given(project=st.text(max_size=80) | st.sampled_from(["1", "1.17", "..", "p1-v1", "%00"]))
    def run(project: str) -> None:
        for path in ("/versions", "/status"):
            reply = client.get(path, query_string={"project": project})
            statuses[reply.status_code] += 1
            assert reply.status_code in (200, 400), (path, project, reply.get_data()[:300])
            if reply.status_code == 400:
                assert "project" in reply.json["error"]

    run()
    assert statuses[200] > 50 and statuses[400] > 0
