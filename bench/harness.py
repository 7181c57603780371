"""What the benchmarks that run real processes share: a free port, an image host, a wait for
the backend to answer. (The tests have their own in tests/processes.py: bench/ and tests/ do
not import each other.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from backend.redis_connection import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_server(files: dict[str, bytes]) -> tuple[ThreadingHTTPServer, str]:
    """A local HTTP host serving `files` (path -> bytes) as Label Studio's uploads would be;
    stop it with ``shutdown()`` and ``server_close()``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = files.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def wait_healthy(
    base: str, proc: subprocess.Popen | None = None, timeout: float = 300, log: Path | None = None
) -> None:
    """Until ``/health`` answers 200; a slow answer is "not yet" (gunicorn listens before its
    workers have loaded the model). Raises if `proc` exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the backend exited early{f': see {log}' if log else ''}")
        try:
            if requests.get(f"{base}/health", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backend did not answer /health within {timeout:.0f} s")
        time.sleep(0.3)


@contextmanager
def deployment(model_dir: Path, images_url: str, logs: Path, **env: str) -> Iterator[str]:
    """An embedded Redis, ``abn serve`` (two gunicorn workers) and ``abn worker`` on
    `model_dir`, images from `images_url` as the Label Studio host; yields the backend's URL
    once it answers, and stops everything at the end (logs under `logs`)."""
    logs.mkdir(parents=True, exist_ok=True)
    # A bench stopped with SIGTERM (kill, a CI runner) unwinds like Ctrl-C, so what it started
    # is stopped below instead of left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with EmbeddedRedis(logs / "redis") as redis:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        environment = {
            **os.environ,
            "REDIS_URL": redis.url,
            "MODEL_DIR": str(model_dir),
            "LABEL_STUDIO_URL": images_url,
            "LABEL_STUDIO_API_KEY": "x",
            **env,
        }
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "backend", *command],
                env=environment,
                cwd=ROOT,
                stdout=(logs / f"{command[0]}.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for command in (["serve", "--port", str(port), "--workers", "2"], ["worker"])
        ]
        try:
            wait_healthy(base, procs[0], log=logs / "serve.log")
            yield base
        except BaseException:
            for name in ("serve", "worker"):
                sys.stderr.write((logs / f"{name}.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut this short
            for proc in procs:
                os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:  # a worker waiting for its job: its horse
                    os.killpg(proc.pid, signal.SIGKILL)  # dies with it (TrainingWorker)
                    proc.wait()
