"""The training queue against a real (embedded) Redis: folding, re-runs, dead jobs, outages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.jobs import TrainingQueue, again_key, alive_key, job_key
from backend.redis_connection import EmbeddedRedis, connect
from backend.store import LoopStore


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


def test_training_requests_fold_into_one_job(redis_url: str, tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    queue = TrainingQueue(connect(redis_url), store)
    assert queue.request("1", "START_TRAINING") == "queued"
    assert queue.request("1", "10 new corrections") == "folded"
    assert queue.request("2", "START_TRAINING") == "queued"  # projects are independent
    assert len(queue.queue) == 2
    job = queue.queue.jobs[0]
    queue.queue.remove(job)  # what a worker does as it starts the job
    job.set_status("started")
    queue.heartbeat("1")
    assert queue.request("1", "more") == "again"
    assert queue.redis.get(again_key("1")) == b"more"
    queue.release("1")  # the running job ends: it is asked to run once more
    assert queue.redis.get(job_key("1")) not in (None, job.id.encode())
    assert len(queue.queue) == 2
    assert store.pending_requests() == []


def test_a_started_job_without_heartbeat_is_taken_as_dead(redis_url: str, tmp_path: Path) -> None:
    queue = TrainingQueue(connect(redis_url), LoopStore(tmp_path / "c.sqlite3"))
    assert queue.request("1", "START_TRAINING") == "queued"
    job = queue.queue.jobs[0]
    queue.queue.remove(job)
    job.set_status("started")  # ...and its worker was killed: no heartbeat
    assert queue.request("1", "again") == "queued"
    assert queue.redis.get(job_key("1")) != job.id.encode()


def test_training_requests_wait_for_redis(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    with EmbeddedRedis(tmp_path / "redis") as server:
        url = server.url
    queue = TrainingQueue(connect(url), store)  # the server is gone now
    assert queue.request("1", "START_TRAINING") == "deferred"
    assert store.pending_requests() == [("1", "START_TRAINING")]
    with EmbeddedRedis(tmp_path / "redis"):  # back, at the same address
        queue = TrainingQueue(connect(url), store)
        assert queue.flush() == 1
        assert len(queue.queue) == 1
    assert store.pending_requests() == []


def test_a_request_to_a_job_that_then_dies_still_leads_to_a_job(
    redis_url: str, tmp_path: Path
) -> None:
    """The worker is SIGKILLed mid-job and START_TRAINING comes before its heartbeat expires."""
    store = LoopStore(tmp_path / "c.sqlite3")
    queue = TrainingQueue(connect(redis_url), store)
    assert queue.request("1", "START_TRAINING") == "queued"
    job = queue.queue.jobs[0]
    queue.queue.remove(job)
    job.set_status("started")
    queue.heartbeat("1")  # the worker beat, then died: the key lives on until its TTL
    assert queue.request("1", "START_TRAINING") == "again"
    assert store.pending_requests() == [("1", "START_TRAINING")]  # kept until a job sees it
    assert queue.flush() == 0  # the job still looks alive: nothing to do yet
    assert store.pending_requests() == [("1", "START_TRAINING")]
    queue.redis.delete(alive_key("1"))  # the heartbeat expires
    assert queue.describe()["jobs"][0]["status"] == "lost"
    assert queue.flush() == 1
    assert store.pending_requests() == []
    assert len(queue.queue) == 1
    assert queue.redis.get(job_key("1")) == queue.queue.jobs[0].id.encode()
    # The dead job's "again" went with it: the new job's end runs no second, empty round.
    assert queue.redis.get(again_key("1")) is None
    queue.release("1")
    assert len(queue.queue) == 1


def test_describe_names_statuses_plainly(redis_url: str, tmp_path: Path) -> None:
    queue = TrainingQueue(connect(redis_url), LoopStore(tmp_path / "c.sqlite3"))
    queue.request("7", "START_TRAINING")
    assert [j["status"] for j in queue.describe()["jobs"]] == ["queued"]
