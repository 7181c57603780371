"""The training queue: at most one fine-tuning job per project, triggers folded into it.

Every trigger is first written to the loop's store (``backend/store.py``, durable), then handed
to RQ. While Redis is unreachable the request waits in the store and
:meth:`TrainingQueue.flush` hands it over once Redis answers again. A trigger that arrives
while the project's job is queued changes nothing; one that arrives while it runs asks the job
to run once more when it ends, and stays in the store until a job will see it.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.job import Job, JobStatus

from backend.redis_connection import die_with_parent
from backend.store import LoopStore

log = logging.getLogger(__name__)

QUEUE_NAME = "abn-training"
JOB_TIMEOUT = 6 * 3600
ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def job_key(project: str) -> str:
    return f"abn:training:{project}"


def again_key(project: str) -> str:
    return f"abn:training:{project}:again"


def alive_key(project: str) -> str:
    """Refreshed by a running job; gone within HEARTBEAT_TTL of the job's process dying."""
    return f"abn:training:{project}:alive"


HEARTBEAT_TTL = 10


class TrainingQueue:
    """RQ behind a small interface: request, flush, release, describe."""

    def __init__(self, redis: Redis, store: LoopStore) -> None:
        self.redis = redis
        self.store = store
        self.queue = Queue(QUEUE_NAME, connection=redis)

    def request(self, project: str, reason: str) -> str:
        """Ask for a job; returns "queued", "folded", "again" or "deferred" (Redis away)."""
        self.store.request_training(project, reason)
        try:
            outcome = self._enqueue(project, reason)
        except RedisError as exc:
            log.warning("Redis unreachable (%s): training of project %s deferred", exc, project)
            return "deferred"
        if outcome != "again":
            self.store.clear_request(project)
        return outcome

    def flush(self) -> int:
        """Hand the waiting requests to the queue; returns how many went.

        A request waits for Redis to come back, or, when it was answered "again", until a job
        exists that will see it: the running job's own re-run, or, if that job's worker died
        (no heartbeat), a new job. Without this, a trigger sent just after a worker was killed
        asked a dead job to run again, and no job ever ran.
        """
        sent = 0
        for project, reason in self.store.pending_requests():
            try:
                outcome = self._enqueue(project, reason)
            except RedisError:
                return sent
            if outcome == "again":
                continue
            self.store.clear_request(project)
            sent += 1
        return sent

    def _active_job(self, project: str) -> Job | None:
        job_id = self.redis.get(job_key(project))
        if job_id is None:
            return None
        job = Job.fetch(job_id.decode(), connection=self.redis) if self._exists(job_id) else None
        status = None if job is None else job.get_status(refresh=True)
        # A job whose worker was killed stays "started" in RQ until the worker's TTL runs out;
        # its missing heartbeat says it is gone now.
        killed = status == JobStatus.STARTED and not self.redis.exists(alive_key(project))
        if status not in ACTIVE or killed:
            if killed:
                log.warning("training job %s of project %s lost its worker", job.id, project)
            # A "run again" for a job that is over without releasing (killed, or its horse
            # died) can never be honoured by it, and the request behind it is still pending in
            # the store: the job made for that request covers it. Left set, that job's release
            # ran one more, which found nothing new and replaced the round's verdict on
            # /status with "skipped".
            self.redis.delete(job_key(project), again_key(project))
            return None
        return job

    def _exists(self, job_id: bytes) -> bool:
        return bool(self.redis.exists(Job.key_for(job_id.decode())))

    def _enqueue(self, project: str, reason: str) -> str:
        job = self._active_job(project)
        if job is not None:
            if job.get_status(refresh=False) == JobStatus.STARTED:
                self.redis.set(again_key(project), reason)
                return "again"
            return "folded"
        job = self.queue.enqueue(
            "backend.training.run_training_job",
            project,
            reason,
            job_timeout=JOB_TIMEOUT,
            result_ttl=7 * 24 * 3600,
            failure_ttl=7 * 24 * 3600,
            description=f"fine-tune project {project} ({reason})",
        )
        if not self.redis.set(job_key(project), job.id, nx=True):
            job.cancel()  # another process enqueued first; theirs stands
            return "folded"
        log.info("queued training job %s for project %s (%s)", job.id, project, reason)
        return "queued"

    def release(self, project: str) -> None:
        """Called by the job as it ends: free the project, and run again if asked meanwhile."""
        self.redis.delete(job_key(project), alive_key(project))
        again = self.redis.getdel(again_key(project))
        if again is not None:
            self.request(project, f"requested while training: {again.decode()}")

    def heartbeat(self, project: str) -> None:
        self.redis.set(alive_key(project), "1", ex=HEARTBEAT_TTL)

    def describe(self) -> dict[str, Any]:
        """Queue length and the jobs of each project, for /status."""
        jobs = []
        for key in self.redis.scan_iter(match=job_key("*")):
            if key.decode().endswith((":again", ":alive")):
                continue
            job_id = self.redis.get(key)
            if job_id is None or not self._exists(job_id):
                continue
            job = Job.fetch(job_id.decode(), connection=self.redis)
            status = job.get_status()
            project = key.decode().removeprefix(job_key(""))
            shown = getattr(status, "value", str(status))
            if status == JobStatus.STARTED and not self.redis.exists(alive_key(project)):
                shown = "lost"  # its worker died; the next request or flush replaces it
            jobs.append({"id": job.id, "project": project, "status": shown, **job.meta})
        return {"queued": len(self.queue), "jobs": jobs}


class TrainingWorker(Worker):
    """RQ's worker, whose work horses die with it (Linux).

    RQ forks each job into a work horse in a process group of its own. A worker killed outright
    (SIGKILL, the OOM killer) used to leave its horse training alone: it never stopped, and it
    could publish a version after another worker had taken the project's job over. The death
    signal is set first thing after the fork, before the job imports torch.
    """

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        self._tie_horse = die_with_parent(signal.SIGKILL)  # libc looked up before the fork
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        if self._tie_horse is not None:
            self._tie_horse()
        super().main_work_horse(job, queue)
