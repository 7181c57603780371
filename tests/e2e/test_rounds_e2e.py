"""Active-learning rounds against a real Label Studio 1.23.2, made by the real ``abn round``.

Label Studio, the backend (gunicorn, basic auth) and ``abn round`` (a subprocess) are real
processes talking HTTP; the shared model is the tiny untrained ABN of tests/conftest.py, so
its scores differ from task to task without any training. The test checks what a project
manager relies on: the tab exists, holds exactly the round's tasks in the order to label them,
and what Label Studio's labeling stream then serves; a task corrected for the current version
is left out of the next round; and the faults leave nothing half-made.

The labeling stream is driven through the call the Data Manager's frontend makes (read from
1.23.2's ``web/dist/apps/labelstudio/167.js``: ``invokeAction("next_task")`` posts
``/api/dm/actions?id=next_task&project=P&tabID=T`` with the tab's ordering and filters, less
what the button's mode drops) and answered by ``data_manager/actions/next_task.py`` and
``projects/functions/next_task.py``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from conftest import CLASSES
from PIL import Image
from processes import ROOT, Loop, running_backend, wait_for

from backend.brush import encode_rle
from backend.label_config import label_config_for
from backend.rounds import one_round_at_a_time, read_rounds
from backend.settings import Settings

from .label_studio import LabelStudioServer

pytestmark = pytest.mark.slow  # a real Label Studio, gunicorn, and the CLI as subprocesses

AUTH = ("annotator-bot", "e2e-secret")
CONFIG = label_config_for(CLASSES)
TASKS = 7  # the first is never predicted; three per round after it


@pytest.fixture
def backend(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Loop]:
    with running_backend(tmp_path, tiny_checkpoint, workers=1, auth=AUTH,
                         ABN_TRAIN_AFTER="1000") as deployment:  # fmt: skip
        yield deployment


@dataclass(frozen=True)
class Run:
    """What one ``abn round`` printed, and how it ended."""

    code: int
    out: str
    err: str


def abn_round(loop: Loop, *args: str | int) -> Run:
    """``abn round ...`` as a project manager runs it, on the backend's MODEL_DIR."""
    proc = subprocess.run(
        [sys.executable, "-m", "backend", "round", *map(str, args)],
        cwd=ROOT,
        env={k: v for k, v in loop.env.items() if not k.startswith("LABEL_STUDIO")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def tab_of(run: Run) -> int:
    """The tab id ``abn round`` printed ("Round 1: ...: tab 12, 3 tasks")."""
    assert run.code == 0, run.err
    return int(run.out.split(": tab ", 1)[1].split(",", 1)[0])


def make_image(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def choice(label: str) -> dict[str, Any]:
    return {"from_name": "class", "to_name": "image", "type": "choices",
            "value": {"choices": [label]}}  # fmt: skip


def correct(ls: LabelStudioServer, task_id: int, lead_time: float) -> dict[str, Any]:
    """Submit the task with its brush edited (the left half painted, the rest erased)."""
    [prediction] = ls.predictions(task_id)
    brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
    width, height = brush["original_width"], brush["original_height"]
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[:, : width // 2] = 255
    edited = {**brush, "origin": "prediction-changed",
              "value": {**brush["value"], "rle": encode_rle(alpha)}}  # fmt: skip
    return ls.api(
        "POST",
        f"/api/tasks/{task_id}/annotations/",
        json={"result": [edited, choice(CLASSES[0])], "lead_time": lead_time},
    )


def confirm(ls: LabelStudioServer, task_id: int) -> dict[str, Any]:
    """Submit the task as predicted: an annotation, but not a correction."""
    [prediction] = ls.predictions(task_id)
    result = [{**r, "origin": "prediction"} for r in prediction["result"]]
    return ls.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})


def next_task(ls: LabelStudioServer, project: int, tab: int, body: dict[str, Any]) -> int | None:
    """The labeling stream's next task, asked as the Data Manager asks it (None: finished)."""
    reply = ls.session.post(
        f"{ls.url}/api/dm/actions",
        params={"id": "next_task", "project": project, "tabID": tab},
        json={**body, "project": project},  # the frontend adds its shared params to the body
        timeout=60,
    )
    if reply.status_code == 404:
        return None
    assert reply.status_code == 200, reply.text
    return int(reply.json()["id"])


def tab_listing(ls: LabelStudioServer, project: int, tab: int) -> list[dict[str, Any]]:
    """The tab's tasks as the Data Manager lists them (its filters and ordering)."""
    return ls.api("GET", "/api/tasks/", params={"project": project, "view": tab})["tasks"]


def as_displayed(view: dict[str, Any]) -> dict[str, Any]:
    """The body of "Label Tasks As Displayed": the tab's ordering and filters."""
    return {"ordering": view["data"]["ordering"], "filters": view["data"]["filters"]}


LABEL_ALL = {}  # "Label All Tasks" with nothing selected: the frontend drops filters and ordering


class CutProxy:
    """A forwarding HTTP proxy to Label Studio that drops the connection, unanswered, for one
    (method, path, query key): Label Studio becoming unreachable at one step of a round."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.cut: tuple[str, str, str | None] | None = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def relay(self) -> None:
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.cut is not None:
                    method, path, key = proxy.cut
                    if (self.command, parts.path) == (method, path) and (
                        key is None or key in parse_qs(parts.query)
                    ):
                        self.close_connection = True
                        self.connection.close()  # no reply at all
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                reply = requests.request(self.command, proxy.target + self.path, data=body,
                                         headers=headers, timeout=60)  # fmt: skip
                self.send_response(reply.status_code)
                for key in ("Content-Type",):
                    if key in reply.headers:
                        self.send_header(key, reply.headers[key])
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_POST = do_DELETE = do_PATCH = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[CutProxy]:
        thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(10)


def test_rounds_are_tabs_that_the_labeling_stream_serves(
    label_studio: LabelStudioServer, backend: Loop, tmp_path: Path
) -> None:
    ls = label_studio
    pid = ls.create_project("ABN rounds e2e", CONFIG)["id"]
    ids = [ls.upload_image(pid, make_image(tmp_path / f"t{i}.png", i))[0] for i in range(TASKS)]
    ls.connect_ml_backend(pid, backend.base, "ABN", basic_auth=AUTH)
    wait_for(
        lambda: any(h.get("headers", {}).get("Authorization") for h in ls.project_webhooks(pid)),
        30,
        "the webhook to carry the backend's auth header",
    )
    unpredicted, predicted = ids[0], ids[1:]
    ls.retrieve_predictions(pid, predicted)  # the first task keeps no prediction
    scores = {t: ls.predictions(t)[0]["score"] for t in predicted}
    assert ls.predictions(unpredicted) == [] and len(set(scores.values())) == len(predicted)
    by_score = sorted(predicted, key=lambda t: scores[t])  # least confident first

    # Round 1: the three least confident tasks, made by the CLI with the host and token that
    # Label Studio's /setup gave the backend.
    first = abn_round(backend, "--project", pid, "--strategy", "least-confident", "--size", 3)
    tab = tab_of(first)
    assert f"Round 1: least-confident, 3 tasks (v1): tab {tab}, 3 tasks" in first.out
    # The link is on the host Label Studio's /setup named (its own idea of its host name).
    assert f":{ls.port}/projects/{pid}/data?tab={tab}\n" in first.out
    assert "left out: 1 no prediction by this version" in first.out
    views = ls.api("GET", "/api/dm/views/", params={"project": pid})
    [view] = [v for v in views if v["id"] == tab]
    assert view["data"]["title"].startswith("Round 1: least-confident")
    assert view["data"]["ordering"] == ["tasks:predictions_score"]
    listing = tab_listing(ls, pid, tab)
    assert {t["id"] for t in listing} == set(by_score[:3])  # exactly the round's tasks
    # Connecting the backend made the project's model version the backend's title ("ABN"), and
    # Label Studio averages only that version's scores: none, so the tab's sort key is empty
    # and the tasks come in id order, not least confident first.
    assert ls.api("GET", f"/api/projects/{pid}/")["model_version"] == "ABN"
    assert [t["predictions_score"] for t in listing] == [None] * 3
    shown = [t["id"] for t in listing]
    assert shown == sorted(by_score[:3])
    [record] = read_rounds(Settings(model_dir=backend.model_dir), str(pid))
    assert (record.view_id, record.tasks) == (tab, shown)  # the record keeps the tab's order
    assert record.in_strategy_order == (shown == by_score[:3])
    if shown != by_score[:3]:
        assert "in another order than least-confident gave" in first.err
        assert "model version 'ABN', which is not v1" in first.err

    # "Label All Tasks" (nothing selected) does not follow the tab: the frontend drops its
    # filters and ordering, and the project's sequential sampling serves the lowest task id.
    assert next_task(ls, pid, tab, LABEL_ALL) == unpredicted
    # Serving it made Label Studio ask the backend for its prediction: with the backend's title
    # as the project's model version, the stream prelabels from live predictions.
    assert [p["model_version"] for p in ls.predictions(unpredicted)] == ["v1"]
    # "Label Tasks As Displayed" serves the tab's tasks in the tab's order, then says it is
    # done; each corrected task (an edited brush) is stored by the backend for v1.
    served = []
    while (task := next_task(ls, pid, tab, as_displayed(view))) is not None:
        assert len(served) < 3, f"the stream served {served} and then {task}"
        served.append(task)
        correct(ls, task, lead_time=2.5)
    assert served == shown
    corrected = {c.task_id for c in backend.store().corrections(str(pid)) if c.edited}
    assert corrected == set(served)

    status = abn_round(backend, "status", "--project", pid)
    assert status.code == 0, status.err
    assert "round 1 (least-confident, 3 tasks, v1 -> not trained yet): 3 submitted, " \
        "3 corrected, 7.5 s" in status.out  # fmt: skip

    # With the project's model version set to v1 (what Settings > Annotation's version choice
    # stores), the tab sorts by v1's scores. Round 2 leaves out what was corrected for v1: the
    # rest (the first task too, predicted now), fewer than asked for, least confident first.
    ls.api("PATCH", f"/api/projects/{pid}/", json={"model_version": "v1"})
    scores[unpredicted] = ls.predictions(unpredicted)[0]["score"]
    rest = sorted(set(ids) - set(served), key=lambda t: scores[t])
    second = abn_round(backend, "--project", pid, "--strategy", "least-confident", "--size", 5)
    tab2 = tab_of(second)
    assert "Round 2: least-confident, 4 tasks (v1)" in second.out
    assert "left out: 3 corrected for this version" in second.out
    assert "only 4 task(s) left for a round of 5" in second.err
    assert "in another order" not in second.err
    listing = tab_listing(ls, pid, tab2)
    assert [t["id"] for t in listing] == rest
    assert [t["predictions_score"] for t in listing] == pytest.approx([scores[t] for t in rest])
    [_, record2] = read_rounds(Settings(model_dir=backend.model_dir), str(pid))
    assert (record2.tasks, record2.in_strategy_order) == (rest, True)
    [view2] = [v for v in ls.api("GET", "/api/dm/views/", params={"project": pid})
               if v["id"] == tab2]  # fmt: skip
    # "Label 2 Tasks" with two of them selected: the selection in the tab's order, no filters.
    picked = {"ordering": view2["data"]["ordering"],
              "selectedItems": {"all": False, "included": [rest[2], rest[1]]}}  # fmt: skip
    assert next_task(ls, pid, tab2, picked) == rest[1]
    served = []
    while (task := next_task(ls, pid, tab2, as_displayed(view2))) is not None:
        assert len(served) < 4, f"the stream served {served} and then {task}"
        served.append(task)
        confirm(ls, task)  # submitted as predicted: they stay candidates
    assert served == rest  # least confident first, as the tab shows them
    status = abn_round(backend, "status", "--project", pid)
    assert "round 2 (least-confident, 4 tasks, v1 -> not trained yet): 4 submitted, " \
        "0 corrected" in status.out  # fmt: skip

    # Faults. Two rounds at once: the second is refused, and nothing is made.
    settings = Settings(model_dir=backend.model_dir)
    before = {v["id"] for v in ls.api("GET", "/api/dm/views/", params={"project": pid})}
    with one_round_at_a_time(settings.layout.rounds(str(pid))):
        busy = abn_round(backend, "--project", pid, "--size", 1)
    assert busy.code != 0 and "another round of this project is being made" in busy.err

    # Label Studio unreachable when the tab is made; then when it is read back (the tab made
    # in Label Studio is taken back). Neither leaves a tab or a record behind.
    with CutProxy(ls.url).running() as proxy:
        for cut, what in (
            (("POST", "/api/dm/views/", None), "/api/dm/views/"),
            (("GET", "/api/tasks/", "view"), "/api/tasks/"),
        ):
            proxy.cut = cut
            lost = abn_round(backend, "--project", pid, "--size", 1,
                             "--label-studio", proxy.url, "--token", ls.token)  # fmt: skip
            assert lost.code != 0 and f"cannot reach Label Studio at {proxy.url}{what}" in lost.err
    after = {v["id"] for v in ls.api("GET", "/api/dm/views/", params={"project": pid})}
    assert after == before
    assert [r.number for r in read_rounds(settings, str(pid))] == [1, 2]

    # A project of other classes has no model: the shared one cannot answer it.
    other = ls.create_project("Other classes", label_config_for(["apple", "pear"]))["id"]
    ls.upload_image(other, make_image(tmp_path / "other.png", 99))
    none = abn_round(backend, "--project", other, "--label-studio", ls.url, "--token", ls.token)
    assert none.code != 0 and f"project {other} has no model yet" in none.err
    assert "apple, pear" in none.err
    assert read_rounds(settings, str(other)) == []
