"""Prometheus metrics of the backend, one registry per Flask app.

A registry per app (not the process-global default) keeps tests and several apps in one
process from sharing counts. Under gunicorn with several workers each worker would count only
its own requests, so :func:`enable_multiprocess` (called by ``serve`` before the workers fork)
switches prometheus_client to its multiprocess mode: every worker writes its values to files in
one folder and ``/metrics``, whichever worker answers, sums them all.

Limitations of that mode (prometheus_client's, documented here so nobody is surprised): only
counters and histograms are exported (no gauges or info metrics), a dead worker's counts remain
in the sums until the folder is removed (which ``serve`` does at exit), and two apps in one
process would share their values.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0)
WEBHOOK_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_DELETED",
        "ANNOTATIONS_CREATED",
        "START_TRAINING",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "REVIEW_CREATED",
        "REVIEW_UPDATED",
        "REVIEWS_DELETED",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
    }
)
_REASON = re.compile(r"^[a-z_]{1,32}$")


class Metrics:
    """The backend's counters and histograms, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "abn_http_requests",
            "HTTP requests answered, by route, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "abn_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "abn_predictions",
            "Tasks given a prediction, by model version",
            ["model_version"],
            registry=r,
        )
        self.prediction_errors = Counter(
            "abn_prediction_errors",
            "Tasks answered with an empty prediction, by reason (missing, too_large, ...)",
            ["reason"],
            registry=r,
        )
        self.batch_latency = Histogram(
            "abn_model_batch_duration_seconds",
            "Time of one batch through the model (preprocessing and forward pass)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "abn_model_batch_size",
            "Images per batch through the model",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.stage_latency = Histogram(
            "abn_predict_stage_duration_seconds",
            "Time /predict spends per stage and batch: fetch (download and decode the "
            "images), model (preprocess and forward), encode (maps to brush results)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.webhooks = Counter(
            "abn_webhooks",
            "Webhook payloads received, by action",
            ["action"],
            registry=r,
        )
        self.map_checks = Counter(
            "abn_map_checks",
            '"Check my map" requests answered, by outcome (checked, no_draft, no_brush, ...)',
            ["outcome"],
            registry=r,
        )

    def count_error(self, reason: str) -> None:
        """Count a failed task; unknown reasons become ``other`` (bounded label values)."""
        self.prediction_errors.labels(reason if _REASON.match(reason) else "other").inc()

    def count_webhook(self, action: str) -> None:
        self.webhooks.labels(action if action in WEBHOOK_ACTIONS else "other").inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; all workers' values in multiprocess mode."""
        path = multiprocess_dir()
        if path and values.ValueClass is not values.MutexValue:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    """The multiprocess folder, when prometheus_client runs in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def enable_multiprocess(path: str) -> None:
    """Switch to multiprocess values before any metric exists in this process.

    prometheus_client picks its value class when first imported, from the environment; this
    sets the variable and the class, so it works even after the import (``backend/server.py``
    imports this module before it knows how many workers it will start). Metrics created
    earlier in this process keep their in-memory values; ``serve`` calls this before any app
    exists (apps are made in the workers).
    """
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()


def make_multiprocess_dir(parent: Path) -> Path:
    """A fresh folder for this process's multiprocess values, under `parent`.

    Folders are named by the owning process id; those whose process is gone (a master killed
    with SIGKILL never ran its exit hook) are removed first.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob("gunicorn-*"):
        pid = old.name.removeprefix("gunicorn-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = parent / f"gunicorn-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    return True
