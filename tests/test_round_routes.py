"""POST /rounds and GET /rounds over real HTTP (werkzeug's server), against the fake Label Studio.

Every refusal is a 4xx (or a 502 when Label Studio fails) that says why, never a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import TOKEN, FakeLabelStudio, serving
from test_rounds import project_four

from backend.app import create_app
from backend.label_config import label_config_for
from backend.rounds import one_round_at_a_time
from backend.serving import ServedModel
from backend.settings import Settings

AUTH = ("pm", "secret")


def app_settings(tmp_path: Path, fake: FakeLabelStudio | None) -> Settings:
    return Settings(
        model_dir=tmp_path,
        label_studio_url=fake.url if fake else None,
        label_studio_api_key=TOKEN if fake else None,
        basic_auth_user=AUTH[0],
        basic_auth_pass=AUTH[1],
    )


@pytest.fixture
def backend(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path, served: ServedModel
) -> Iterator[str]:
    project_four(tmp_path, fake_ls, tiny_checkpoint)
    with serving(create_app(app_settings(tmp_path, fake_ls), served=served)) as base:
        yield base


def post(base: str, body: object, auth: tuple[str, str] | None = AUTH) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{base}/rounds", data=data, headers=headers, auth=auth, timeout=30)


def error(reply: requests.Response) -> str:
    return reply.json()["error"]


def test_a_round_over_http_is_made_then_listed(
    backend: str, fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.accept_views = True
    fake_ls.add(
        "/api/tasks/?project=4&view=1&page_size=1000",
        json.dumps({"tasks": [{"id": 1}, {"id": 2}]}).encode(),
    )
    reply = post(backend, {"project": 4, "strategy": "least-confident", "size": 2})
    assert reply.status_code == 201, reply.text
    made = reply.json()
    assert (made["number"], made["view_id"], made["tasks"]) == (1, 1, [1, 2])
    assert made["in_strategy_order"] is True  # the tab shows them as least-confident chose
    listed = requests.get(f"{backend}/rounds", params={"project": 4}, auth=AUTH, timeout=30)
    assert listed.status_code == 200
    assert [r["number"] for r in listed.json()["rounds"]] == [1]
    assert listed.json()["rounds"][0]["training"] is None
    empty = requests.get(f"{backend}/rounds", params={"project": 5}, auth=AUTH, timeout=30)
    assert empty.json() == {"project": 5, "rounds": []}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "malformed JSON"),
        ([4], 400, "must be a JSON object"),
        ({}, 400, "missing field 'project'"),
        ({"project": "4"}, 400, "field 'project' must be an integer"),
        ({"project": -1}, 400, "field 'project' must be an integer in 0.."),
        ({"project": 4, "size": 0}, 400, "field 'size' must be an integer in 1..1000"),
        ({"project": 4, "size": 10**6}, 400, "field 'size' must be an integer in 1..1000"),
        ({"project": 4, "strategy": "best"}, 400, "field 'strategy' must be one of"),
        ({"project": 4, "strategy": 3}, 400, "field 'strategy' must be a strategy"),
        ({"project": 7}, 404, "projects/7/ with HTTP 404"),  # Label Studio has no project 7
        ({"project": 4}, 502, "HTTP 501"),  # the fake answers no POST: Label Studio failing
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    backend: str, tmp_path: Path, body: object, status: int, message: str
) -> None:
    reply = post(backend, body)
    assert reply.status_code == status, reply.text
    assert message in error(reply)
    assert list((tmp_path / "rounds").glob("*/round-*.json")) == []  # nothing half-made


def test_auth_one_round_at_a_time_and_bad_queries(backend: str, tmp_path: Path) -> None:
    assert post(backend, {"project": 4}, auth=None).status_code == 401
    assert post(backend, {"project": 4}, auth=("pm", "wrong")).status_code == 401
    with one_round_at_a_time(Settings(model_dir=tmp_path).layout.rounds("4")):
        reply = post(backend, {"project": 4})
    assert reply.status_code == 409 and "another round of this project" in error(reply)
    for params in ({}, {"project": "abc"}, {"project": "-3"}, {"project": str(2**64)}):
        listed = requests.get(f"{backend}/rounds", params=params, auth=AUTH, timeout=30)
        assert listed.status_code == 400 and "'project' must be a project id" in error(listed)


def test_refresh_when_label_studio_fails_is_a_502(
    backend: str, fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    folder = Settings(model_dir=tmp_path).layout.rounds("4")
    folder.mkdir(parents=True)
    record = {"project": 4, "number": 1, "strategy": "random", "size": 1, "version": "v1",
              "tasks": [1], "view_id": 1, "title": "Round 1", "url": "", "created_at": 0.0,
              "left_out": {}}  # fmt: skip
    (folder / "round-1.json").write_text(json.dumps(record))
    fake_ls.add("/api/projects/4/", b"boom", status=500)
    reply = requests.get(
        f"{backend}/rounds", params={"project": 4, "refresh": "1"}, auth=AUTH, timeout=30
    )
    assert reply.status_code == 502 and "HTTP 500" in error(reply)


def test_a_project_without_a_label_studio_host_is_told_how_to_connect(
    tmp_path: Path, tiny_checkpoint: Path, served: ServedModel, fake_ls: FakeLabelStudio
) -> None:
    project_four(tmp_path, fake_ls, tiny_checkpoint)
    with serving(create_app(app_settings(tmp_path, None), served=served)) as base:
        reply = post(base, {"project": 4})
        assert reply.status_code == 409 and "no Label Studio host known" in error(reply)


def test_a_project_without_a_model_is_told_to_train_one(
    tmp_path: Path, served: ServedModel, fake_ls: FakeLabelStudio
) -> None:
    # Nothing published.
    with serving(create_app(app_settings(tmp_path, fake_ls), served=served)) as base:
        reply = post(base, {"project": 4})
        assert reply.status_code == 409 and "project 4 has no model yet" in error(reply)


def test_a_project_of_other_classes_is_told_it_has_no_model(
    backend: str, fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    config = label_config_for(["apple", "pear"])  # the shared v1 knows cat, dog, fox
    fake_ls.add("/api/projects/4/", json.dumps({"id": 4, "label_config": config}).encode())
    reply = post(backend, {"project": 4})
    assert reply.status_code == 409, reply.text
    assert "project 4 has no model yet (its classes apple, pear are not those of the shared " \
        "model v1: cat, dog, fox)" in error(reply)  # fmt: skip
    assert list((tmp_path / "rounds").glob("*/round-*.json")) == []
