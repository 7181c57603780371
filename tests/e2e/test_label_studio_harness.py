"""The harness against the real server, and what the server sends an ML backend.

Also the template for the full e2e test: a recording stand-in backend (``RecordingBackend``)
shows exactly which calls Label Studio 1.23.2 makes, with which auth and bodies.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .label_studio import LabelStudioServer

logger = logging.getLogger(__name__)

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="attention" toName="image"><Label value="Attention"/></BrushLabels>
  <Choices name="class" toName="image"><Choice value="a"/><Choice value="b"/></Choices>
</View>"""

BASIC_USER, BASIC_PASS = "ls", "s3cret"
BASIC_HEADER = "Basic " + base64.b64encode(f"{BASIC_USER}:{BASIC_PASS}".encode()).decode()


@dataclass
class Call:
    """One request the stand-in backend received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class RecordingBackend:
    """A minimal ML backend that records every call and demands basic auth where the real one
    will (everything but ``/webhook``, which Label Studio sends without it)."""

    model_version: str = "v0"
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RecordingBackend:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("backend: " + fmt, *args)

            def _reply(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                path = self.path.split("?")[0].rstrip("/") or "/"
                with backend.lock:
                    backend.calls.append(Call(self.command, path, dict(self.headers), body))
                if path != "/webhook" and self.headers.get("Authorization") != BASIC_HEADER:
                    self._reply(401, {"error": "basic auth required"})
                elif path == "/health":
                    self._reply(200, {"status": "UP", "model_class": "RecordingBackend"})
                elif path == "/setup":
                    self._reply(200, {"model_version": backend.model_version})
                elif path == "/versions":
                    self._reply(200, {"versions": [backend.model_version]})
                elif path == "/predict":
                    tasks = (body or {}).get("tasks") or []
                    results = [
                        {"result": [], "score": 0.5, "model_version": backend.model_version}
                        for _ in tasks
                    ]
                    self._reply(200, {"results": results})
                elif path == "/webhook":
                    self._reply(200, {})
                else:
                    self._reply(404, {"error": f"no {path}"})

            do_GET = do_POST = _handle  # http.server dispatches on do_<METHOD>

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def of(self, path: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.path == path]

    def webhooks(self, action: str) -> list[Call]:
        return [c for c in self.of("/webhook") if (c.body or {}).get("action") == action]

    def wait_for(self, pred: Callable[[], list[Call]], timeout: float = 10.0) -> list[Call]:
        """Webhooks are sent before the API call returns; the wait only guards a slow box."""
        deadline = time.monotonic() + timeout
        while not (found := pred()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return found


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    b = RecordingBackend().start()
    try:
        yield b
    finally:
        b.stop()


def _png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_harness_against_real_label_studio(
    label_studio: LabelStudioServer, backend: RecordingBackend, tmp_path: Path
) -> None:
    ls = label_studio
    project = ls.create_project("harness", LABEL_CONFIG)
    pid = project["id"]

    # Tasks: one uploaded file, one from a local-files storage.
    uploaded_ids = ls.upload_image(pid, _png(tmp_path / "upload.png"))
    assert len(uploaded_ids) == 1
    _png(ls.document_root / "images" / "local.png")
    storage = ls.add_local_storage(pid, "images", r".*\.png")
    assert storage["id"]
    tasks = ls.tasks(pid)
    images = sorted(t["data"]["image"] for t in tasks)
    assert len(images) == 2, images
    assert images[0] == "/data/local-files/?d=images/local.png", images
    assert images[1].startswith(f"/data/upload/{pid}/") and images[1].endswith("upload.png")
    for url in images:  # both are served to the token holder
        r = ls.session.get(ls.url + url, timeout=10)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG", (url, r.status_code)

    # Connect the backend with basic auth: /health and /setup must carry it.
    ml = ls.connect_ml_backend(pid, backend.url, "recorder", basic_auth=(BASIC_USER, BASIC_PASS))
    assert ml["auth_method"] == "BASIC_AUTH" and ml["basic_auth_user"] == BASIC_USER
    assert "basic_auth_pass" not in ml and ml["basic_auth_pass_is_set"] is True
    assert backend.of("/health") and backend.of("/setup")
    for call in backend.of("/health") + backend.of("/setup"):
        assert call.headers.get("Authorization") == BASIC_HEADER, call
    setup = backend.of("/setup")[-1].body
    assert setup["schema"] == project["label_config"]
    assert setup["project"].startswith(f"{pid}.")
    assert setup["access_token"] == ls.token
    logger.info("/setup body: %s", setup)

    # Predictions: the Data Manager action makes the server call /predict.
    reply = ls.retrieve_predictions(pid)
    logger.info("retrieve_predictions reply: %s", reply)
    predict = backend.of("/predict")
    assert len(predict) == 1  # one batch with every task that lacks a current prediction
    assert all(c.headers.get("Authorization") == BASIC_HEADER for c in predict)
    sent = [t["id"] for c in predict for t in c.body["tasks"]]
    assert sorted(sent) == sorted(t["id"] for t in tasks)
    logger.info("/predict body keys: %s", sorted(predict[0].body))
    logger.info("/predict task keys: %s", sorted(predict[0].body["tasks"][0]))
    for t in tasks:
        preds = ls.predictions(t["id"])
        assert [p["model_version"] for p in preds] == [backend.model_version], preds
        assert preds[0]["score"] == 0.5 and preds[0]["result"] == []

    # The project webhook the server added for the backend; webhooks go out without auth.
    hooks = [h for h in ls.project_webhooks(pid) if h["url"] == f"{backend.url}/webhook"]
    assert len(hooks) == 1, ls.project_webhooks(pid)
    hook = hooks[0]
    assert hook["send_for_all_actions"] and hook["send_payload"] and hook["is_active"]
    task = tasks[0]
    result = [
        {
            "id": "c1",
            "from_name": "class",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["a"]},
        }
    ]
    first = ls.create_annotation(task["id"], result)
    created = backend.wait_for(lambda: backend.webhooks("ANNOTATION_CREATED"))
    assert len(created) == 1 and "Authorization" not in created[0].headers

    # Except START_TRAINING: the server sends it to <backend>/webhook itself, with basic auth.
    ls.train(ml["id"])
    training = backend.wait_for(lambda: backend.webhooks("START_TRAINING"))
    assert len(training) == 1 and training[0].body["project"]["id"] == pid
    assert training[0].headers.get("Authorization") == BASIC_HEADER
    logger.info("START_TRAINING keys: %s", sorted(training[0].body))

    # ... until the webhook is given the header.
    updated_hook = ls.set_webhook_headers(hook["id"], {"Authorization": BASIC_HEADER})
    assert updated_hook["headers"] == {"Authorization": BASIC_HEADER}
    second = ls.create_annotation(task["id"], result)
    created = backend.wait_for(lambda: backend.webhooks("ANNOTATION_CREATED")[1:])
    assert created and created[0].headers.get("Authorization") == BASIC_HEADER
    body = created[0].body
    assert body["annotation"]["id"] == second["id"]
    assert body["annotation"]["result"] == result
    assert body["task"]["id"] == task["id"] and body["project"]["id"] == pid
    logger.info("ANNOTATION_CREATED keys: %s", sorted(body))
    logger.info("  annotation keys: %s", sorted(body["annotation"]))

    ls.update_annotation(second["id"], [{**result[0], "value": {"choices": ["b"]}}])
    updated = backend.wait_for(lambda: backend.webhooks("ANNOTATION_UPDATED"))
    assert updated and updated[0].body["annotation"]["result"][0]["value"]["choices"] == ["b"]

    ls.delete_annotation(first["id"])
    deleted = backend.wait_for(lambda: backend.webhooks("ANNOTATIONS_DELETED"))
    assert deleted and deleted[0].body["annotations"] == [{"id": first["id"]}]

    logger.info(
        "calls received: %s",
        [
            (c.method, c.path, (c.body or {}).get("action") if c.path == "/webhook" else None)
            for c in backend.calls
        ],
    )
