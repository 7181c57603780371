"""Real processes for integration tests: the backend under gunicorn, RQ workers, Redis.

Shared by tests/test_loop.py and the end-to-end tests under tests/e2e.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from backend.layout import ModelDirLayout
from backend.redis_connection import EmbeddedRedis
from backend.registry import ModelRegistry
from backend.store import LoopStore

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Send `sig` to `proc`'s process group (it was started in a session of its own) and wait;
    whatever is still there after `timeout` seconds is killed, and so is any descendant left
    outside the group (RQ's work horse has a process group of its own), so no test leaves one."""
    descendants = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def is_dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie nobody has reaped yet (an orphan's new parent may be slow to)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Loop:
    """A running deployment: its URL, MODEL_DIR, Redis and processes."""

    base: str
    model_dir: Path
    env: dict[str, str]
    redis: EmbeddedRedis
    logs: Path
    auth: tuple[str, str] | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend", *args],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a kill reaches RQ's work horse too
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        stop_group(self.procs.pop(name), sig)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def get(self, path: str) -> dict[str, Any]:
        return requests.get(self.base + path, timeout=10, auth=self.auth).json()

    def post(self, path: str, body: Any) -> requests.Response:
        return requests.post(self.base + path, json=body, timeout=10, auth=self.auth)

    def version(self, project: str | None = None) -> str:
        """The shared model's version, or what answers `project` (its own model, or shared)."""
        if project is None:
            return self.get("/health")["model_version"]
        return self.get(f"/status?project={project}")["project"]["model_version"]

    def everyone_serves(self, version: str, project: str | None = None) -> bool:
        """Several calls in a row (so both gunicorn workers answer) name `version`."""
        return all(self.version(project) == version for _ in range(8))

    def registry(self, project: str | None = None) -> ModelRegistry:
        """The shared model's registry, or `project`'s own lineage."""
        return ModelRegistry(self.model_dir, project)

    def store(self) -> LoopStore:
        return LoopStore(ModelDirLayout(self.model_dir).corrections_db)


@contextmanager
def running_backend(
    tmp_path: Path,
    checkpoint: Path | None,
    workers: int = 2,
    auth: tuple[str, str] | None = None,
    **env: str,
) -> Iterator[Loop]:
    """`checkpoint` published as the shared v1 (None: no shared model), an embedded Redis,
    and `abn serve` on a free port."""
    model_dir = tmp_path / "model_dir"
    if checkpoint is not None:
        ModelRegistry(model_dir).publish_file(checkpoint, reason="initial model")
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    with EmbeddedRedis(tmp_path / "redis") as redis:
        environment = {
            **os.environ,
            "REDIS_URL": redis.url,
            "MODEL_DIR": str(model_dir),
            "OMP_NUM_THREADS": "1",
            **env,
        }
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if auth is not None:
            environment.update(BASIC_AUTH_USER=auth[0], BASIC_AUTH_PASS=auth[1])
        deployment = Loop(f"http://127.0.0.1:{port}", model_dir, environment, redis, logs, auth)
        deployment.start(
            "serve", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)
        )
        try:
            wait_for(lambda: _up(deployment), 120, "the backend: " + deployment.log("serve"))
            yield deployment
        finally:
            for name in list(deployment.procs):
                deployment.stop(name)


def healthy(base: str, auth: tuple[str, str] | None = None) -> bool:
    """Whether /health answers. Gunicorn listens before its workers have loaded the model, so
    a request can wait seconds on a busy machine: a slow answer means "not yet", not a failure
    (the caller's deadline bounds the wait)."""
    try:
        return requests.get(base + "/health", timeout=10, auth=auth).status_code == 200
    except requests.RequestException:
        return False


def _up(loop: Loop) -> bool:
    assert loop.procs["serve"].poll() is None, loop.log("serve")
    return healthy(loop.base, loop.auth)
