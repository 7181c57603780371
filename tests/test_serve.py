"""`abn serve` and `abn run` as an operator starts them: first start, exposure, leftovers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from processes import ROOT, free_port, healthy, stop_group, wait_for
from redis import Redis
from redis.exceptions import RedisError

from backend.registry import ModelRegistry
from backend.settings import Settings, SettingsError, is_loopback

pytestmark = pytest.mark.slow  # starts real servers

START_WAIT = 240  # a first start loads torch twice on a possibly busy machine; a hang never ends


def _serve(model_dir: Path, log: Path, *args: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "MODEL_DIR": str(model_dir), **env}
    for name in ("PROMETHEUS_MULTIPROC_DIR", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        environment.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "backend", "serve", *args],
        cwd=ROOT,
        env=environment,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _healthy(proc: subprocess.Popen, base: str, log: Path) -> bool:
    assert proc.poll() is None, log.read_text()
    return healthy(base)


def test_first_start_with_a_checkpoint_answers_with_parallel_torch(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Empty MODEL_DIR, one worker, torch allowed two threads: this start used to hang forever.

    The master published the checkpoint (a parallel load_state_dict) and then forked; the worker
    waited forever in libgomp. Now the master does no torch work of its own.
    """
    port = free_port()
    log = tmp_path / "serve.log"
    model_dir = tmp_path / "model_dir"
    proc = _serve(
        model_dir,
        log,
        "--port",
        str(port),
        "--workers",
        "1",
        "--checkpoint",
        str(tiny_checkpoint),
        OMP_NUM_THREADS="2",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(proc, base, log), START_WAIT, "/health: " + log.read_text())
        assert requests.get(f"{base}/health", timeout=30).json()["model_version"] == "v1"
    finally:
        stop_group(proc)
    assert ModelRegistry(model_dir).current()["version"] == "v1"
    assert proc.returncode == 0, log.read_text()


def test_a_killed_master_leaves_nothing_the_next_start_keeps(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Several workers share a metrics folder; SIGKILL cannot clean it, the next start does."""
    model_dir = tmp_path / "model_dir"
    ModelRegistry(model_dir).publish_file(tiny_checkpoint, reason="initial model")
    before = set(Path("/tmp").glob("abn-metrics-*"))
    log = tmp_path / "serve.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = _serve(model_dir, log, "--port", str(port), "--workers", "2", OMP_NUM_THREADS="1")
    try:
        wait_for(lambda: _healthy(first, base, log), START_WAIT, "/health: " + log.read_text())
        [stale] = (model_dir / "metrics").iterdir()
        assert stale.name == f"gunicorn-{first.pid}"
    finally:
        stop_group(first, signal.SIGKILL)
    assert stale.is_dir()  # nobody could remove it
    second = _serve(model_dir, log, "--port", str(port), "--workers", "2", OMP_NUM_THREADS="1")
    try:
        wait_for(lambda: _healthy(second, base, log), START_WAIT, "/health: " + log.read_text())
        assert [p.name for p in (model_dir / "metrics").iterdir()] == [f"gunicorn-{second.pid}"]
    finally:
        stop_group(second)
    assert list((model_dir / "metrics").iterdir()) == []  # a clean stop removes its own
    assert set(Path("/tmp").glob("abn-metrics-*")) == before


@pytest.mark.parametrize("command", ["serve", "run"])
def test_listening_beyond_loopback_needs_auth(tmp_path: Path, command: str) -> None:
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "model_dir")}
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "ABN_ALLOW_UNAUTHENTICATED"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "backend", command, "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "refusing to listen on '0.0.0.0' without authentication" in done.stderr
    assert "BASIC_AUTH_USER" in done.stderr
    assert not (tmp_path / "model_dir" / "registry.json").exists()  # refused before anything


def test_exposure_rules() -> None:
    open_settings = Settings()
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host)
        open_settings.check_exposure(host)
    for host in ("0.0.0.0", "::", "10.0.0.5", "backend.example"):
        assert not is_loopback(host)
        with pytest.raises(SettingsError, match="without authentication"):
            open_settings.check_exposure(host)
    Settings(basic_auth_user="u", basic_auth_pass="p").check_exposure("0.0.0.0")
    Settings(allow_unauthenticated=True).check_exposure("0.0.0.0")
    env = Settings.from_env({"ABN_ALLOW_UNAUTHENTICATED": "1"})
    assert env.allow_unauthenticated
    with pytest.raises(SettingsError, match="ABN_ALLOW_UNAUTHENTICATED"):
        Settings.from_env({"ABN_ALLOW_UNAUTHENTICATED": "maybe"})


def run_environment(model_dir: Path, scratch: Path) -> dict[str, str]:
    """What a newcomer's `abn run` sees: this MODEL_DIR and TMPDIR, no Redis, no auth, and
    the product's own defaults rather than the suite's (torch's cache)."""
    environment = {**os.environ, "MODEL_DIR": str(model_dir), "TMPDIR": str(scratch)}
    for name in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "BASIC_AUTH_USER", "BASIC_AUTH_PASS",
                 "TORCHINDUCTOR_CACHE_DIR"):  # fmt: skip
        environment.pop(name, None)
    return environment


def start_run(environment: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`abn run` on a free port, its output to `log`; the process and its URL."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "run", "--port", str(port)],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}"


def test_run_says_ready_restarts_a_dead_redis_and_leaves_nothing(tmp_path: Path) -> None:
    """A newcomer's `abn run`: no model trained, READY once it answers; an embedded Redis that
    dies is restarted at the same socket (and /health is UP again), and while it is down
    /health and /status say so (not hidden behind "UP"); a stop leaves nothing in TMPDIR."""
    scratch = tmp_path / "tmp"  # the embedded Redis puts its folder here
    scratch.mkdir()
    model_dir = tmp_path / "model_dir"
    log = tmp_path / "run.log"
    proc, base = start_run(run_environment(model_dir, scratch), log)

    def health() -> dict:
        return requests.get(f"{base}/health", timeout=30).json()

    def kill_redis() -> None:
        """SIGKILL, as the OOM killer would (a SHUTDOWN through redis-py would be retried by
        the client, and so reach the restarted server too)."""
        [server] = [
            p for p in psutil.Process(proc.pid).children() if p.name().startswith("redis-server")
        ]
        server.kill()

    def answers(socket_path: Path) -> bool:
        try:
            return bool(Redis(unix_socket_path=str(socket_path), socket_timeout=2).ping())
        except RedisError:
            return False

    try:
        wait_for(lambda: f"READY {base}".encode() in log.read_bytes(), START_WAIT, "READY")
        text = log.read_text()
        assert "no shared model" in text and "abn label-config --classes" in text
        assert text.index("Connect a Label Studio project") < text.index("READY")
        first = health()
        assert first["model_version"] is None and "degraded" not in first
        assert not Settings(model_dir=model_dir).layout.demo_checkpoint.exists()  # no --demo
        [socket_path] = scratch.glob("abn-redis-*/redis.sock")

        # 1. It dies: `abn run` starts it again at the same socket, by itself.
        kill_redis()
        wait_for(lambda: b"the embedded Redis is back" in log.read_bytes(), 60, "a restart")
        assert answers(socket_path) and "the embedded Redis exited (code -9" in log.read_text()
        wait_for(lambda: "degraded" not in health(), 60, "/health UP: " + log.read_text())

        # 2. It stays down while `abn run` is stopped: /health and /status say so...
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            kill_redis()

            def degraded() -> list[str]:
                return health().get("degraded", [])

            [reason] = wait_for(degraded, 60, "/health to say Redis is gone: " + log.read_text())
            assert reason.startswith("Redis unreachable")
            assert requests.get(f"{base}/status", timeout=30).json()["degraded"] == [reason]
            assert not answers(socket_path)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # ...and once it runs again it restarts Redis, and /health and /status are clean.
        wait_for(lambda: answers(socket_path), 60, "the second restart: " + log.read_text())
        wait_for(lambda: "degraded" not in health(), 60, "/health UP again: " + log.read_text())
        status = requests.get(f"{base}/status", timeout=30).json()
        assert status["degraded"] == [] and "error" not in (status["queue"] or {})
        assert log.read_text().count("the embedded Redis is back") == 2
        assert proc.poll() is None  # it served throughout
    finally:
        stop_group(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()  # the worker says it lost Redis, in one line
    # Nothing is left, torch's compile cache included (it goes to MODEL_DIR: backend/__init__).
    assert list(scratch.iterdir()) == []


def test_a_killed_run_takes_its_children_along_and_the_next_start_clears_up(
    tmp_path: Path,
) -> None:
    """SIGKILL leaves `abn run` no chance to stop anything: its worker, backend and embedded
    Redis get SIGTERM from the kernel instead, and the Redis folder it could not remove is
    removed by the next start (once it is old enough not to be another run's fresh one)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    environment = run_environment(tmp_path / "model_dir", scratch)

    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first, base = start_run(environment, first_log)
    second = None
    everything: list[psutil.Process] = []
    try:
        wait_for(lambda: f"READY {base}".encode() in first_log.read_bytes(), START_WAIT, "READY")
        everything = psutil.Process(first.pid).children(recursive=True)
        names = {p.name() for p in everything}
        assert any(n.startswith("redis-server") for n in names), names
        [left] = scratch.glob("abn-redis-*")
        first.kill()
        first.wait()

        def all_gone() -> bool:
            for p in everything:
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        return False
                except psutil.NoSuchProcess:
                    continue
            return True

        wait_for(all_gone, 120, f"the children of a killed abn run to stop: {everything}")
        assert not healthy(base)
        assert left.is_dir()  # nobody could remove it: the next start does
        an_hour_ago = time.time() - 3600
        os.utime(left, (an_hour_ago, an_hour_ago))
        second, base = start_run(environment, second_log)
        wait_for(lambda: f"READY {base}".encode() in second_log.read_bytes(), START_WAIT, "READY")
        assert not left.exists() and f"removed {left}" in second_log.read_text()
        assert len(list(scratch.glob("abn-redis-*"))) == 1  # the second run's own
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_group(proc)
        for p in everything:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert second.returncode == 0, second_log.read_text()[-3000:]
    assert list(scratch.iterdir()) == []
