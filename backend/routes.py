"""The routes: the Label Studio ML protocol, plus status, versions, rollback and metrics.

- ``GET /health``: JSON liveness with the served version (plain text fails the connection);
- ``POST /setup``: checks the project's label config against the served model, remembers the
  project's Label Studio host and token (for images), answers ``{"model_version"}``;
- ``POST /predict``: one entry per task, in order; tasks go through the model in batches; a task
  whose image fails gets an empty entry and the others are still predicted;
- ``POST /webhook``: acknowledges every action; annotation events become stored corrections,
  ``START_TRAINING`` and enough new corrections queue a fine-tuning job (``backend/loop.py``);
- ``GET /versions`` (the published versions), ``POST /rollback`` (serve an earlier one),
  ``GET /status`` (version, queue, job progress, last results), ``GET /metrics`` (Prometheus).

Each route reads the process's services (``backend/services.py``) and only does I/O around
them. Requests over a limit (``ABN_MAX_REQUEST_BYTES``, ``ABN_MAX_TASKS_PER_REQUEST``,
``ABN_BRUSH_MAX_PIXELS``) are 413s that name the setting; replies show paths relative to
MODEL_DIR (or file names only).
"""

from __future__ import annotations

import logging
import os
import re
import time

from flask import Blueprint, Response, jsonify, request

from backend.label_config import LabelConfigError, check_config, default_targets
from backend.registry import RegistryError
from backend.request_io import (
    RequestError,
    check_body,
    error_reply,
    json_object,
    parse_body,
)
from backend.schemas import WEBHOOK_EVENTS, PredictBody, RollbackBody, SetupBody, WebhookBody
from backend.services import services
from backend.webhooks import WebhookError
from model.checkpoint import CheckpointError

log = logging.getLogger(__name__)

protocol = Blueprint("protocol", __name__)


@protocol.get("/health")
def health() -> Response:
    state = services()
    return jsonify(status="UP", model_class="ABN", model_version=state.served.version)


@protocol.post("/setup")
def setup() -> Response:
    state = services()
    body = parse_body(SetupBody)
    schema = body["schema"]
    project = body.get("project")
    hostname = body.get("hostname")
    token = body.get("access_token")
    snap = state.served.snapshot  # one read: the classes checked are the version answered
    try:
        check_config(schema, snap.classes)
    except LabelConfigError as exc:
        log.warning("setup refused for project %s: %s", project, exc)
        return error_reply(400, f"label config refused: {exc}")
    if hostname:
        if not re.match(r"^https?://[^\s/]+", hostname):
            raise RequestError(f"hostname must be an http(s) URL, got {hostname!r}")
        try:
            state.loader.connections.remember(
                project, hostname, token, authenticated=state.settings.auth_enabled
            )
        except ValueError as exc:  # backend.images.HostRefused: names the setting
            log.warning("setup refused for project %s: %s", project, exc)
            return error_reply(getattr(exc, "status", 403), str(exc))
    if state.webhook_auth is not None:
        conn = state.loader.connection_for(project)
        key = state.loader.connections.project_key(project)
        if conn is not None and conn.token and key and key.isdigit():
            state.webhook_auth.ensure(conn, key, request.url_root.rstrip("/") + "/webhook")
    return jsonify(model_version=snap.version)


@protocol.post("/predict")
def predict() -> Response:
    state = services()
    body = json_object()
    tasks = body.get("tasks")
    if isinstance(tasks, list) and len(tasks) > state.settings.max_tasks_per_request:
        message = (
            f"{len(tasks)} tasks in one request, more than ABN_MAX_TASKS_PER_REQUEST="
            f"{state.settings.max_tasks_per_request}; select fewer tasks at a time"
        )
        log.warning("/predict refused: %s", message)
        return error_reply(413, message)
    check_body(PredictBody, body)
    label_config = body.get("label_config")
    project = body.get("project")
    snap = state.served.snapshot
    try:
        targets = (
            check_config(label_config, snap.classes)
            if label_config
            else default_targets(snap.classes)
        )
    except LabelConfigError as exc:
        return error_reply(400, f"label config refused: {exc}")
    results = state.predictor.predict(tasks, targets, snap, project)
    key = state.loader.connections.project_key(project)
    predicted = [t.get("id") for t, r in zip(tasks, results, strict=True) if r["result"]]
    if key and predicted and all(isinstance(t, int) for t in predicted):
        state.loop.store.record_predictions(key, predicted, snap.version)
    return jsonify(results=results, model_version=snap.version)


@protocol.post("/webhook")
def webhook() -> Response:
    state = services()
    payload = parse_body(WebhookBody)
    action = payload["action"]
    state.metrics.count_webhook(action)
    try:
        event = WEBHOOK_EVENTS.get(action)
        if event is not None:
            check_body(event, payload)
        reply = state.loop.webhooks.handle(
            payload, brush_max_pixels=state.settings.brush_max_pixels
        )
    except RequestError as exc:
        log.warning("webhook %s refused: %s", action, exc)
        raise
    except WebhookError as exc:
        log.warning("webhook %s refused: %s", action, exc)
        return error_reply(exc.status, str(exc))
    return jsonify(status="ok", **reply)


@protocol.get("/versions")
def versions() -> Response:
    state = services()
    records = state.loop.registry.versions()
    names = [r["version"] for r in records] or [state.served.version]
    return jsonify(versions=names, current=state.served.version, records=state.paths.scrub(records))


@protocol.post("/rollback")
def rollback() -> Response:
    state = services()
    version = parse_body(RollbackBody)["version"]
    try:
        record = state.loop.rollback(version)
    except RegistryError as exc:
        return error_reply(404, state.paths.scrub(str(exc)))
    except CheckpointError as exc:
        return error_reply(409, f"cannot roll back to {version}: {state.paths.scrub(str(exc))}")
    return jsonify(status="ok", version=record["version"], serving=state.served.version)


@protocol.get("/status")
def status() -> Response:
    state = services()
    return jsonify(
        state.paths.scrub(
            dict(
                status="UP",
                model_version=state.served.version,
                model=state.served.info(),
                pid=os.getpid(),
                uptime_s=round(time.time() - state.started_at, 1),
                auth=state.settings.auth_enabled,
                **state.loop.status(),
            )
        )
    )


@protocol.get("/metrics")
def metrics() -> Response:
    state = services()
    body, content_type = state.metrics.render()
    return Response(body, content_type=content_type)
