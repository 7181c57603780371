""" "Check my map" through the real app: a /predict whose context holds a point of the check
control answers the top-3 with the user's latest drafted brush, in the top-3 box."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASSES, FakeLabelStudio, png_bytes
from flask import Flask
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from test_app import make_settings, post

from backend.app import create_app
from backend.brush import encode_rle
from backend.corrections import alpha_to_map
from backend.label_config import CHECK_LABEL, label_config_for
from backend.map_check import NO_DRAFT
from backend.predictions import top3_lines
from backend.serving import ServedModel
from model import load_checkpoint
from model.edited_map import predict_with_map

CONFIG = label_config_for(CLASSES)
WIDTH, HEIGHT = 40, 30
IMAGE = "/data/upload/1/a.png"
POINT = {
    "id": "pt1",
    "type": "keypointlabels",
    "from_name": "check",
    "to_name": "image",
    "original_width": WIDTH,
    "original_height": HEIGHT,
    "value": {"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": [CHECK_LABEL]},
    "origin": "manual",
}


@pytest.fixture
def app(tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel) -> Flask:
    fake_ls.add(IMAGE, png_bytes(WIDTH, HEIGHT))
    return create_app(make_settings(tmp_path, fake_ls), served=served)


@pytest.fixture
def client(app: Flask):
    return app.test_client()


def brush(alpha: np.ndarray, origin: str = "prediction-changed", label: str = "Attention") -> dict:
    """A brush result as the editor saves it in a draft."""
    height, width = alpha.shape
    return {
        "id": "b" + origin[:4],
        "type": "brushlabels",
        "from_name": "attention",
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": encode_rle(alpha), "brushlabels": [label]},
        "origin": origin,
    }


def draft(results: list[dict], draft_id: int = 7, updated_at: str = "2026-01-01T10:00:00Z"):
    return {
        "id": draft_id,
        "result": results,
        "created_at": updated_at,
        "updated_at": updated_at,
        "user": "annotator@example.com",
    }


def check_body(drafts: list[dict] | None, **changes: Any) -> dict[str, Any]:
    """What Label Studio 1.23.2 sends /predict for a check point (docs/loop.md, section 5)."""
    task = {"id": 3, "data": {"image": IMAGE}, "annotations": [], "predictions": []}
    if drafts is not None:
        task["drafts"] = drafts
    body = {
        "tasks": [task],
        "project": "1.1700000000",
        "label_config": CONFIG,
        "params": {"login": None, "password": None, "context": {"result": [POINT]}},
    }
    body.update(changes)
    return body


def painted() -> np.ndarray:
    """An edit the model cannot have made: the left half fully on, the right half off."""
    alpha = np.zeros((HEIGHT, WIDTH), np.uint8)
    alpha[:, : WIDTH // 2] = 255
    return alpha


def expected(tiny_checkpoint: Path, alpha: np.ndarray) -> list[str]:
    """The top-3 lines `model.edited_map` gives directly with the brush as /webhook reads it."""
    model, meta = load_checkpoint(tiny_checkpoint)
    image = Image.open(io.BytesIO(png_bytes(WIDTH, HEIGHT))).convert("RGB")
    return top3_lines(predict_with_map(model, meta, image, alpha_to_map(alpha, 4)))


def own_line(served: ServedModel) -> str:
    (own,) = served.predict([Image.open(io.BytesIO(png_bytes(WIDTH, HEIGHT))).convert("RGB")])
    return "With its own map: " + "   ".join(top3_lines(own))


def lines_of(reply) -> list[str]:
    assert reply.status_code == 200, reply.get_data(as_text=True)
    [entry] = reply.json["results"]
    [result] = entry["result"]
    assert (result["type"], result["from_name"], result["to_name"]) == ("textarea", "top3", "image")
    assert result["readonly"] is True
    assert LabelInterface(CONFIG).validate_prediction(entry, return_errors=True) == []
    return result["value"]["text"]


def test_a_check_answers_the_top3_with_the_drafted_map(
    client, app: Flask, served: ServedModel, tiny_checkpoint: Path
) -> None:
    """Two brushes (the edited prediction, a stroke of its own) merge as /webhook merges them."""
    stroke = np.zeros((HEIGHT, WIDTH), np.uint8)
    stroke[20:, 30:] = 255
    merged = np.maximum(painted(), stroke)
    body = check_body([draft([brush(painted()), brush(stroke, "manual")])])
    lines = lines_of(post(client, "/predict", body))
    want = expected(tiny_checkpoint, merged)
    assert lines[1:4] == want
    assert lines[0] == f"With your map the model says {want[0].split()[1]}:"
    assert lines[4] == own_line(served)
    assert lines[1:4] != own_line(served).removeprefix("With its own map: ").split("   ")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'abn_map_checks_total{outcome="checked"} 1.0' in metrics
    assert app.extensions["abn"].loop.store.predicted_version("1", 3) is None  # not a prediction


def test_a_drafts_strokes_are_painted_over_the_brush_it_loaded(
    client, tiny_checkpoint: Path
) -> None:
    """The editor autosaves a brush as the RLE it loaded plus the strokes since (``touches``,
    in percent of the image): the left half painted over an empty brush, as one stroke."""
    result = brush(np.zeros((HEIGHT, WIDTH), np.uint8))
    left_half = {"type": "add", "relativePoints": [25, -60, 25, 160], "relativeStrokeWidth": 50}
    result["value"]["touches"] = [left_half]
    lines = lines_of(post(client, "/predict", check_body([draft([result])])))
    assert lines[1:4] == expected(tiny_checkpoint, painted())


def test_the_latest_draft_is_checked(client, tiny_checkpoint: Path) -> None:
    newer = draft([brush(painted())], draft_id=8, updated_at="2026-01-01T10:05:00Z")
    older = draft([brush(np.full((HEIGHT, WIDTH), 255, np.uint8))], draft_id=9)
    lines = lines_of(post(client, "/predict", check_body([newer, older])))
    assert lines[1:4] == expected(tiny_checkpoint, painted())


def test_an_unedited_draft_says_so(client, tiny_checkpoint: Path) -> None:
    lines = lines_of(
        post(client, "/predict", check_body([draft([brush(painted(), "prediction")])]))
    )
    assert lines[0].startswith("With your map (the model's own, unedited) the model says")
    assert lines[1:4] == expected(tiny_checkpoint, painted())


def test_no_draft_says_so_with_the_models_own_top3(client, served: ServedModel) -> None:
    for drafts in (None, []):
        assert lines_of(post(client, "/predict", check_body(drafts))) == [
            *NO_DRAFT,
            own_line(served),
        ]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'abn_map_checks_total{outcome="no_draft"} 2.0' in metrics


def test_a_draft_without_a_brush_says_so(client, served: ServedModel) -> None:
    choice = {
        "id": "c1",
        "type": "choices",
        "from_name": "class",
        "to_name": "image",
        "value": {"choices": ["dog"]},
    }
    other_label = brush(painted(), label="Other")  # not the attention label
    for results in ([], [choice], [POINT, other_label]):
        lines = lines_of(post(client, "/predict", check_body([draft(results)])))
        assert lines == ["Nothing to check: your draft has no Attention brush.", own_line(served)]


def test_an_image_that_does_not_load_is_a_line_that_says_why(client) -> None:
    body = check_body([draft([brush(painted())])])
    body["tasks"][0]["data"]["image"] = "/data/upload/1/missing.png"
    [line] = lines_of(post(client, "/predict", body))
    assert line.startswith("Cannot check your map: the image did not load (") and "404" in line


def test_a_project_without_a_model_is_told_so(client) -> None:
    config = label_config_for(["apple", "pear"])  # classes no model has: a new project
    [line] = lines_of(post(client, "/predict", check_body([], label_config=config)))
    assert line.startswith("No model to check your map with: ")


def test_a_context_without_a_check_point_is_predicted_as_before(client) -> None:
    """Another control's region, or a config without the control: a plain prediction."""
    other = {**POINT, "from_name": "elsewhere"}
    without_control = label_config_for(CLASSES, check=None)
    bodies = [
        check_body(None, params={"context": {"result": [other]}}),
        check_body(None, params={"context": {"result": []}}),
        check_body(None, params={"context": {}}),
        check_body(None, label_config=without_control),
    ]
    for body in bodies:
        reply = post(client, "/predict", body)
        assert reply.status_code == 200
        [entry] = reply.json["results"]
        assert [r["type"] for r in entry["result"]] == ["brushlabels", "choices", "textarea"]


def with_touches(touches: Any) -> dict:
    result = brush(painted())
    result["value"]["touches"] = touches
    return result


def rle_of_another_size() -> dict:
    result = brush(painted())
    result["value"]["rle"] = encode_rle(np.zeros((10, 10), np.uint8))
    return result


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"params": {"context": "check"}}, "params.context must be an object, got a string"),
        ({"params": {"context": {"result": 5}}}, "params.context.result must be an array"),
        ({"params": {"context": {"result": [5]}}}, "params.context.result[0] must be an object"),
        (
            {"params": {"context": {"result": [{**POINT, "from_name": 3}]}}},
            "params.context.result[0].from_name must be a string",
        ),
        (
            {"params": {"context": {"result": [POINT] * 101}}},
            "params.context.result must be an array of at most 100 objects, got 101",
        ),
        ({"params": []}, "field 'params' must be an object"),
    ],
)
def test_a_bad_context_is_a_400_naming_the_field(client, change: dict, needle: str) -> None:
    reply = post(client, "/predict", check_body(None, **change))
    assert reply.status_code == 400, reply.get_data(as_text=True)
    assert needle in reply.json["error"]


@pytest.mark.parametrize(
    ("drafts", "needle"),
    [
        ("mine", "tasks[0].drafts must be an array"),
        ([{"result": []}], "tasks[0].drafts[0].id must be an integer"),
        ([{"id": 1, "result": {}}], "tasks[0].drafts[0].result must be an array"),
        ([{"id": 1, "result": [7]}], "tasks[0].drafts[0].result[0] must be an object"),
        (
            [draft([{**brush(painted()), "original_width": "40"}])],
            "tasks[0].drafts[0].result[0].original_width must be an integer",
        ),
        ([draft([rle_of_another_size()])], "RLE header counts 400 RGBA values"),
        (
            [draft([{**brush(painted()), "value": {"rle": "abc", "brushlabels": ["Attention"]}}])],
            "result[0].value.rle must be an array",
        ),
        (
            [draft([brush(painted()), brush(np.zeros((10, 10), np.uint8), "manual")])],
            "another brush of the same image is 40x30",
        ),
        ([draft([with_touches(5)])], "value.touches must be an array of objects"),
        ([draft([with_touches([{"relativePoints": ["x"]}])])], "must be a number (not NaN"),
        ([draft([with_touches([{"relativePoints": [1]}])])], "touch 0: relativePoints must"),
        ([draft([with_touches([{"relativePoints": [1, 2], "type": "x"}])])], "type must be one"),
    ],
)
def test_a_bad_draft_is_a_400_naming_what_is_wrong(client, drafts: Any, needle: str) -> None:
    reply = post(client, "/predict", check_body(drafts))
    assert reply.status_code == 400, reply.get_data(as_text=True)
    assert needle in reply.json["error"]


def test_a_check_without_a_task_id_or_of_two_tasks_is_a_400(client) -> None:
    body = check_body([])
    del body["tasks"][0]["id"]
    reply = post(client, "/predict", body)
    assert reply.status_code == 400 and "tasks[0].id must be an integer" in reply.json["error"]
    body = check_body([])
    body["tasks"].append(dict(body["tasks"][0], id=4))
    reply = post(client, "/predict", body)
    assert reply.status_code == 400 and "one task" in reply.json["error"]


def test_a_huge_declared_brush_is_a_413_before_anything_is_decoded(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    """A few bytes declaring 16384x16384: refused on its declared size (decoding it would cost
    a quarter of a GB), before the image is fetched."""
    app = create_app(make_settings(tmp_path, fake_ls, brush_max_pixels=10_000), served=served)
    huge = {**brush(painted()), "original_width": 16384, "original_height": 16384}
    reply = post(app.test_client(), "/predict", check_body([draft([huge])]))
    assert reply.status_code == 413
    assert (
        "16384x16384" in reply.json["error"] and "ABN_BRUSH_MAX_PIXELS=10000" in reply.json["error"]
    )
    assert not [r for r in fake_ls.requests if r[1] == IMAGE]  # the image was never fetched
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'abn_map_checks_total{outcome="refused"} 1.0' in metrics


def test_strokes_too_many_to_paint_are_a_413(client) -> None:
    points = [50.0, 50.0] * 50_001
    reply = post(
        client, "/predict", check_body([draft([with_touches([{"relativePoints": points}])])])
    )
    assert reply.status_code == 413 and "50001 points in all" in reply.json["error"]


def test_a_check_is_bounded_by_the_body_limit(
    tmp_path: Path, fake_ls: FakeLabelStudio, served: ServedModel
) -> None:
    """A draft's RLE is as big as the body may be, and no bigger (ABN_MAX_REQUEST_BYTES)."""
    app = create_app(make_settings(tmp_path, fake_ls, max_request_bytes=50_000), served=served)
    noisy = np.random.default_rng(0).integers(0, 256, (HEIGHT * 4, WIDTH * 4), dtype=np.uint8)
    data = json.dumps(check_body([draft([brush(noisy)])]))
    assert len(data) > 50_000
    reply = app.test_client().post("/predict", data=data, content_type="application/json")
    assert reply.status_code == 413
