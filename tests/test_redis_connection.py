"""backend/redis_connection.py: the embedded Redis starts, restarts and leaves nothing behind."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from backend import redis_connection
from backend.redis_connection import LOG_TAIL_BYTES, EmbeddedRedis, connect


def test_the_embedded_redis_leaves_no_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile caches TMPDIR once read
    with EmbeddedRedis() as redis:
        own = redis.directory
        assert own.parent == tmp_path and redis.socket.is_socket()
        connect(redis.url).set("k", "v")
        redis.stop_server()
        assert not redis.running() and not redis.socket.exists()
        redis.start_server()  # a restart keeps the data
        assert connect(redis.url).get("k") == b"v"
    assert not own.exists()
    assert list(tmp_path.iterdir()) == []


def test_an_embedded_redis_that_cannot_start_leaves_no_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr(redis_connection, "redis_server_binary", lambda: "/bin/false")
    with pytest.raises(RuntimeError, match="exited with 1 at start"), EmbeddedRedis():
        pass
    assert list(tmp_path.iterdir()) == []


def _wait_until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_killed_server_is_restarted_with_its_data(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="backend.redis_connection")
    with EmbeddedRedis(tmp_path / "redis") as redis:
        client = connect(redis.url)
        client.set("k", "v")
        client.save()
        first = redis.process.pid
        assert redis.supervise() is True and redis.restarts == 0  # alive: nothing to do
        os.kill(first, signal.SIGKILL)
        redis.process.wait()
        _wait_until(redis.supervise)  # the first restart after a short death waits ~1 s
        assert redis.restarts == 1 and redis.running() and redis.process.pid != first
        assert connect(redis.url).get("k") == b"v"  # same socket, same data
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "exited (code -9" in errors[0].getMessage()
        assert any("is back after" in r.getMessage() for r in caplog.records)


class Clock:
    """A clock for the object under test, moved by hand: the backoff is checked on
    its schedule, not on how fast this machine runs."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def test_a_server_that_cannot_start_is_retried_with_backoff_and_few_errors(
    tmp_path: Path, caplog, monkeypatch
) -> None:
    caplog.set_level(logging.INFO, logger="backend.redis_connection")
    with EmbeddedRedis(tmp_path / "redis") as redis:
        clock = Clock()
        redis.clock = clock
        redis.process.kill()
        redis.process.wait()
        # A binary that exits at once: every restart fails.
        real_binary = redis_connection.redis_server_binary
        monkeypatch.setattr(redis_connection, "redis_server_binary", lambda: "/bin/false")
        tries = []
        start = redis.start_server

        def counted() -> None:
            tries.append(clock.now)
            start()

        monkeypatch.setattr(redis, "start_server", counted)
        began = clock.now
        for _ in range(240):  # two minutes of abn run's half-second rounds
            assert redis.supervise() is False
            clock.now += 0.5
        # Waits of 1, 2, 4, 8, 16, 30, 30, ... s: a handful of tries, not one every round.
        offsets = [round(t - began) for t in tries]
        assert offsets == [1, 3, 7, 15, 31, 61, 91]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "exited (code -9" in errors[0]
        # The death, then one "still down" line at 61 s: at most one a minute.
        assert len(errors) == 2 and "still down after 61 s" in errors[1]
        monkeypatch.setattr(redis_connection, "redis_server_binary", real_binary)
        for _ in range(61):  # the next try, at most 30 s on, starts the real binary again
            if redis.supervise():
                break
            clock.now += 0.5
        assert redis.running() and connect(redis.url).ping() and redis.restarts == 1


def test_a_client_without_a_url_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="REDIS_URL is not set"):
        connect(None)


def test_the_workers_lost_redis_lines_are_rate_limited() -> None:
    from backend import cli

    clock = Clock()
    limit = cli.RateLimit("could not connect to Redis", 60.0)
    limit.clock = clock

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("rq.worker", logging.ERROR, __file__, 1, msg, None, None)

    passed = []
    for _ in range(90):  # RQ's pubsub thread: one line every 2 s for 3 minutes
        line = record("Worker w: could not connect to Redis instance: gone retrying in 2 seconds")
        if limit.filter(line):
            passed.append(line.getMessage())
        assert limit.filter(record("an unrelated line"))
        clock.now += 2.0
    assert len(passed) == 3  # at 0, 60 and 120 s
    assert passed[1].endswith("(29 such lines left out)")


def test_the_log_tail_is_the_latest_starts_last_line_read_from_the_end(tmp_path: Path) -> None:
    redis = EmbeddedRedis(tmp_path / "redis")
    redis.directory.mkdir()
    assert redis.log_tail() == "(no log)"
    old = b"an earlier start's line\n" * 4
    redis.logfile.write_bytes(old)
    redis._log_offset = len(old)  # as start_server sets it
    assert redis.log_tail() == "(no output)"  # this start wrote nothing yet
    # A server that ran for months: megabytes since its start, of which the tail is read.
    with redis.logfile.open("ab") as log_file:
        log_file.write(b"\xff" * (4 * LOG_TAIL_BYTES) + b"\n# Server started\nlast words\n")
    assert redis.log_tail() == "last words"
