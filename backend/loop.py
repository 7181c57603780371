"""The serving side of the human-in-the-loop: webhooks in, new versions followed.

One :class:`ServingLoop` per serving process: what that process runs of the human-in-the-loop.
It owns the loop's store and the training queue behind ``/webhook``, and a maintenance thread
that keeps the served model on the registry's current version (hot-swap) and hands waiting
training requests to the queue (once Redis answers again, or once a dead job is gone). It never
trains: the worker does (``backend/training.py``).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from redis.exceptions import RedisError

from backend.hotswap import RegistryWatcher
from backend.jobs import TrainingQueue
from backend.redis_connection import connect
from backend.registry import ModelRegistry
from backend.serving import ServedModel
from backend.settings import Settings
from backend.store import LoopStore
from backend.webhooks import WebhookHandler

log = logging.getLogger(__name__)

FLUSH_EVERY = 2.0  # seconds between retries of training requests that wait for Redis


class ServingLoop:
    """Store, queue, webhook handler and hot-swap of one serving process."""

    def __init__(self, settings: Settings, served: ServedModel) -> None:
        self.settings = settings
        self.store = LoopStore(settings.layout.corrections_db)
        self.registry = ModelRegistry(settings.model_dir)
        self.queue = (
            TrainingQueue(connect(settings.redis_url), self.store) if settings.redis_url else None
        )
        self.webhooks = WebhookHandler(self.store, self.queue, served, settings.train_after)
        self.watcher = RegistryWatcher(self.registry, served)
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
                self.watcher.check()
                since_flush += self.settings.swap_interval
                if self.queue is not None and since_flush >= FLUSH_EVERY:
                    since_flush = 0.0
                    if self.store.pending_requests():
                        sent = self.queue.flush()
                        if sent:
                            log.info("Redis is back: %d deferred training request(s) sent", sent)
            except Exception:  # the thread must outlive any one bad round
                log.exception("maintenance round failed")

    def rollback(self, version: str) -> dict[str, Any]:
        """Make `version` current, and serve it from this process at once."""
        record = self.registry.rollback(version)
        self.watcher.check()
        return record

    def last_jobs(self) -> dict[str, Any]:
        """The last result of each project's job, as the worker recorded it."""
        results = {}
        for path in sorted(self.settings.layout.jobs.glob("*.json")):
            try:
                results[path.stem] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
        return results

    def status(self) -> dict[str, Any]:
        queue: dict[str, Any] | None = None
        if self.queue is not None:
            try:
                queue = self.queue.describe()
            except RedisError as exc:
                queue = {"error": f"Redis unreachable: {exc}"}
        return {
            "queue": queue,
            "pending_requests": [p for p, _ in self.store.pending_requests()],
            "corrections": self.store.summary(),
            "last_jobs": self.last_jobs(),
            "swap_error": self.watcher.last_error,
        }
