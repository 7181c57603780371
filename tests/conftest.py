"""Shared fixtures: a tiny ABN checkpoint and a fake Label Studio host serving images.

Everything is small (64 px inputs, a 4x4 attention map) so that the suite stays fast on two
shared cores; the model is built once per session.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Before torch loads OpenMP: spinning idle OpenMP workers make torch ops tens of times slower
# on a busy two-core machine (see bench/predict.py); passive waiting keeps the suite fast.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Importing torchvision makes torch's compile cache, under /tmp by default; the suite leaves
# nothing there (the product moves it the same way: backend/__init__.py).
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(Path(__file__).resolve().parent.parent / "runs" / "cache" / "torch"),
)

import numpy as np
import pytest
import torch
from PIL import Image

from model import build_abn, save_checkpoint
from model.checkpoint import make_meta

CLASSES = ["cat", "dog", "fox"]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After pytest has removed a passing run's temporary folder, remove what it leaves in
    /tmp: its dead `pytest-current` link and the then empty `pytest-of-<user>` folder."""
    basetemp = getattr(getattr(session.config, "_tmp_path_factory", None), "_basetemp", None)
    if exitstatus != 0 or basetemp is None or basetemp.exists():
        return
    parent = basetemp.parent
    current = parent / "pytest-current"
    if current.is_symlink() and not current.exists():
        current.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        parent.rmdir()  # only when empty: other runs' folders stay


TOKEN = "test-token-123"


def png_bytes(
    width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    """A small PNG with a gradient, so the model sees something other than a flat colour."""
    img = Image.new("RGB", (width, height), color)
    for x in range(width):
        for y in range(0, height, max(1, height // 4)):
            img.putpixel((x, y), (x * 255 // max(1, width - 1), 255 - color[1], 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ABN-ResNet18 with 3 classes at 64 px (4x4 attention map)."""
    torch.manual_seed(0)
    model = build_abn("resnet18", len(CLASSES))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, make_meta("abn", "resnet18", CLASSES, image_size=64))
    return path


@pytest.fixture(scope="session")
def loaded_model(tiny_checkpoint: Path):
    """The tiny checkpoint loaded once for the session (batch size 4, to exercise batching)."""
    from backend.serving import ServedModel

    return ServedModel.from_checkpoint(tiny_checkpoint, batch_size=4)


@pytest.fixture
def served(loaded_model):
    """The session's served model, put back as it was after each test: an app under test may
    hot-swap it to a version of its MODEL_DIR, which the next test must not inherit."""
    before = loaded_model.snapshot
    yield loaded_model
    if loaded_model.snapshot is not before:
        loaded_model.swap(before.version, before.model, before.meta, source=before.source)


@dataclass
class FakeLabelStudio:
    """A local HTTP server standing in for Label Studio's file and webhook endpoints.

    ``files`` maps a path (with query) to (status, body, headers); paths under ``/data/``,
    ``/storage-data/``, ``/tasks/`` and ``/api/`` need ``Authorization: Token <token>``.
    Special paths: ``/slow`` answers after ``slow_seconds``; ``/endless`` streams bytes
    without a length until the client goes away.
    """

    token: str = TOKEN
    files: dict[str, tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    patches: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    slow_seconds: float = 2.0
    url: str = ""
    views: list[dict[str, Any]] = field(default_factory=list)  # tabs made (POST /api/dm/views/)
    accept_views: bool = False  # else POST /api/dm/views/ is a 501, as any other POST

    def add(self, path: str, body: bytes, status: int = 200, **headers: str) -> str:
        self.files[path] = (status, body, headers)
        return path

    def protected(self, path: str) -> bool:
        return path.startswith(("/data/", "/storage-data/", "/tasks/", "/api/"))


def _handler(fake: FakeLabelStudio) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            headers = dict(headers or {})
            headers.setdefault("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            try:
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timeouts, size limits): expected in tests
                self.close_connection = True

        def _authorized(self) -> bool:
            path = urlsplit(self.path).path
            if not fake.protected(path):
                return True
            return self.headers.get("Authorization") == f"Token {fake.token}"

        def do_GET(self) -> None:
            fake.requests.append(("GET", self.path, dict(self.headers)))
            if not self._authorized():
                self._send(401, b'{"detail": "no token"}')
                return
            parts = urlsplit(self.path)
            if parts.path == "/slow":
                time.sleep(fake.slow_seconds)
                self._send(200, b"late")
                return
            if parts.path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                try:
                    for _ in range(10_000):
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    pass
                self.close_connection = True
                return
            if parts.path == "/api/webhooks/":
                project = parse_qs(parts.query).get("project", [""])[0]
                hooks = [h for h in fake.webhooks if str(h["project"]) == project]
                self._send(200, json.dumps(hooks).encode(), {"Content-Type": "application/json"})
                return
            entry = fake.files.get(self.path) or fake.files.get(parts.path)
            if entry is None:
                self._send(404, b"not found")
                return
            status, body, headers = entry
            self._send(status, body, headers)

        def do_POST(self) -> None:
            """Creating a Data Manager tab: answered with a new id (other POSTs: 501)."""
            fake.requests.append(("POST", self.path, dict(self.headers)))
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))  # kept-alive
            if not self._authorized():
                self._send(401, b"{}")
                return
            if urlsplit(self.path).path != "/api/dm/views/" or not fake.accept_views:
                self._send(501, b"not here")
                return
            fake.views.append(json.loads(body or b"{}"))
            reply = json.dumps({"id": len(fake.views), **fake.views[-1]}).encode()
            self._send(201, reply, {"Content-Type": "application/json"})

        def do_DELETE(self) -> None:
            fake.requests.append(("DELETE", self.path, dict(self.headers)))
            self._send(204, b"")

        def do_PATCH(self) -> None:
            fake.requests.append(("PATCH", self.path, dict(self.headers)))
            if not self._authorized():
                self._send(401, b"{}")
                return
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            hook_id = int(urlsplit(self.path).path.rstrip("/").rsplit("/", 1)[-1])
            fake.patches.append((hook_id, body))
            for hook in fake.webhooks:
                if hook["id"] == hook_id:
                    hook.update(body)
            self._send(200, b"{}", {"Content-Type": "application/json"})

    return Handler


@pytest.fixture
def fake_ls() -> Iterator[FakeLabelStudio]:
    """A fake Label Studio host on a free local port, for the duration of one test."""
    fake = FakeLabelStudio()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    # No Nagle (as gunicorn): http.server writes headers and body separately, and a kept-alive
    # connection would otherwise wait ~40 ms for the client's delayed ACK.
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def make_image_dataset(
    root: Path,
    classes: list[str],
    human_map: np.ndarray | None,
    per_class: int = 2,
    seed: int = 0,
) -> Path:
    """Random images in the on-disk layout; every image gets `human_map` (None: no maps)."""
    rng = np.random.default_rng(seed)
    size = 32 if human_map is None else human_map.shape[0]
    for split in ("train", "test"):
        for name in classes:
            for i in range(per_class):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
                if human_map is not None:
                    map_folder = root / "maps" / split / name
                    map_folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(human_map).save(map_folder / f"{i}.png")
    return root


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """A WSGI `app` behind werkzeug's threaded HTTP server on a free port (it handles chunked
    bodies); stopped, its socket closed and its thread joined on exit."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
