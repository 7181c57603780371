"""The serving side of the human-in-the-loop: webhooks in, new versions followed.

One :class:`ServingLoop` per serving process: what that process runs of the human-in-the-loop.
It owns the loop's store and the training queue behind ``/webhook``, and a maintenance thread
that keeps every loaded model (the shared one and each project's) on its registry's current
version (hot-swap) and hands waiting training requests to the queue (once Redis answers
again, or once a dead job is gone). It never trains: the worker does (``backend/training.py``).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from redis.exceptions import RedisError

from backend.jobs import TrainingQueue
from backend.project_models import ProjectModels
from backend.redis_connection import connect
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import LoopStore
from backend.webhooks import WebhookHandler

log = logging.getLogger(__name__)

FLUSH_EVERY = 2.0  # seconds between retries of training requests that wait for Redis


class ServingLoop:
    """Store, queue, webhook handler and hot-swap of one serving process."""

    def __init__(self, settings: Settings, models: ProjectModels) -> None:
        self.settings = settings
        self.models = models
        self.store = LoopStore(settings.layout.corrections_db)
        self.queue = (
            TrainingQueue(connect(settings.redis_url), self.store) if settings.redis_url else None
        )
        self.webhooks = WebhookHandler(
            self.store, self.queue, models, settings.train_after, settings.train_first_after
        )
        self.redis_error: str | None = None  # why Redis does not answer, None while it does
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._maintain, name="abn-loop", daemon=True)

    def start(self) -> ServingLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _maintain(self) -> None:
        since_flush = 0.0
        while not self._stop.wait(self.settings.swap_interval):
            try:
                self.models.check()
                since_flush += self.settings.swap_interval
                if self.queue is not None and since_flush >= FLUSH_EVERY:
                    since_flush = 0.0
                    self.check_redis()
                    if self.store.pending_requests():
                        sent = self.queue.flush()
                        if sent:
                            log.info("Redis is back: %d deferred training request(s) sent", sent)
            except Exception:  # the thread must outlive any one bad round
                log.exception("maintenance round failed")

    def check_redis(self) -> None:
        """Ping Redis; say so once when it goes away and once when it is back, not every time."""
        if self.queue is None:
            return
        try:
            self.queue.redis.ping()
        except RedisError as exc:
            if self.redis_error is None:
                log.error("Redis unreachable (%s): training requests wait in the store", exc)
            self.redis_error = f"Redis unreachable: {exc}"
            return
        if self.redis_error is not None:
            log.info("Redis answers again")
        self.redis_error = None

    def degraded(self) -> list[str]:
        """What does not work now, for /health and /status (empty: everything does)."""
        return [self.redis_error] if self.redis_error else []

    def rollback(self, version: str) -> dict[str, Any]:
        """Make `version` current in its lineage (its name says which), and serve it from this
        process at once."""
        record = ModelRegistry.of_version(self.settings.model_dir, version).rollback(version)
        self.models.check()
        return record

    def last_jobs(self, project: str | None = None) -> dict[str, Any]:
        """The last result of each project's job (or of `project`'s), as the worker recorded it."""
        results = {}
        for path in sorted(self.settings.layout.jobs.glob("*.json")):
            if project is not None and path.stem != project:
                continue
            try:
                results[path.stem] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
        return results

    def status(self, project: str | None = None) -> dict[str, Any]:
        """The loop's state, all projects' or one project's."""
        queue: dict[str, Any] | None = None
        if self.queue is not None:
            try:
                queue = self.queue.describe()
            except RedisError as exc:
                queue = {"error": f"Redis unreachable: {exc}"}
            if project is not None and "jobs" in queue:
                queue["jobs"] = [j for j in queue["jobs"] if j.get("project") == project]
        corrections = self.store.summary()
        pending = [p for p, _ in self.store.pending_requests()]
        if project is not None:
            corrections = {p: c for p, c in corrections.items() if p == project}
            pending = [p for p in pending if p == project]
        return {
            "queue": queue,
            "pending_requests": pending,
            "corrections": corrections,
            "last_jobs": self.last_jobs(project),
            "swap_errors": self.models.swap_errors(),
        }
