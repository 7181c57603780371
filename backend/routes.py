"""The routes: the Label Studio ML protocol, plus status, versions, rollback and metrics.

- ``GET /health``: JSON liveness with the served version (plain text fails the connection);
- ``POST /setup``: checks the project's label config against the served model, remembers the
  project's Label Studio host and token (for images), answers ``{"model_version"}``;
- ``POST /predict``: one entry per task, in order; tasks go through the model in batches; a task
  whose image fails gets an empty entry and the others are still predicted;
- ``POST /webhook``: acknowledges every action; annotation events become stored corrections,
  ``START_TRAINING`` and enough new corrections queue a fine-tuning job (``backend/loop.py``);
- ``POST /train``: what Label Studio calls when its START_TRAINING webhook is off (the
  "Start model training on annotation submission" toggle): the same as that webhook;
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
import time

from flask import Blueprint, Response, jsonify, request

from backend.label_config import LabelConfigError, check_config, default_targets
from backend.label_studio import HostRefused
from backend.registry import RegistryError
from backend.request_io import (
    RequestError,
    check_body,
    error_reply,
    json_object,
    parse_body,
)
from backend.schemas import (
    WEBHOOK_EVENTS,
    PredictBody,
    RollbackBody,
    SetupBody,
    TrainBody,
    WebhookBody,
)
from backend.services import services
from backend.webhooks import WebhookError
from model.checkpoint import CheckpointError

log = logging.getLogger(__name__)

protocol = Blueprint("protocol", __name__)


@protocol.get("/health")
def health() -> Response:
    svc = services()
    return jsonify(status="UP", model_class="ABN", model_version=svc.served.version)


@protocol.post("/setup")
def setup() -> Response:
    svc = services()
    body = parse_body(SetupBody)
    schema = body["schema"]
    project = body.get("project")
    hostname = body.get("hostname")
    token = body.get("access_token")
    snap = svc.served.snapshot  # one read: the classes checked are the version answered
    try:
        check_config(schema, snap.classes)
    except LabelConfigError as exc:
        log.warning("setup refused for project %s: %s", project, exc)
        return error_reply(400, f"label config refused: {exc}")
    if hostname:
        try:
            svc.loader.connections.remember(
                project, hostname, token, authenticated=svc.settings.auth_enabled
            )
        except HostRefused as exc:  # the message names the setting
            log.warning("setup refused for project %s: %s", project, exc)
            return error_reply(exc.status, str(exc))
    if svc.webhook_auth is not None:
        conn = svc.loader.connection_for(project)
        key = svc.loader.connections.project_key(project)
        if conn is not None and conn.token and key and key.isdigit():
            svc.webhook_auth.ensure(conn, key, request.url_root.rstrip("/") + "/webhook")
    return jsonify(model_version=snap.version)


@protocol.post("/predict")
def predict() -> Response:
    svc = services()
    body = json_object()
    tasks = body.get("tasks")
    if isinstance(tasks, list) and len(tasks) > svc.settings.max_tasks_per_request:
        message = (
            f"{len(tasks)} tasks in one request, more than ABN_MAX_TASKS_PER_REQUEST="
            f"{svc.settings.max_tasks_per_request}; select fewer tasks at a time"
        )
        log.warning("/predict refused: %s", message)
        return error_reply(413, message)
    check_body(PredictBody, body)
    label_config = body.get("label_config")
    project = body.get("project")
    snap = svc.served.snapshot
    try:
        targets = (
            check_config(label_config, snap.classes)
            if label_config
            else default_targets(snap.classes)
        )
    except LabelConfigError as exc:
        return error_reply(400, f"label config refused: {exc}")
    results = svc.predictor.predict(tasks, targets, snap, project)
    key = svc.loader.connections.project_key(project)
    predicted = [t.get("id") for t, r in zip(tasks, results, strict=True) if r["result"]]
    if key and predicted and all(isinstance(t, int) for t in predicted):
        svc.loop.store.record_predictions(key, predicted, snap.version)
    return jsonify(results=results, model_version=snap.version)


@protocol.post("/webhook")
def webhook() -> Response:
    svc = services()
    payload = parse_body(WebhookBody)
    action = payload["action"]
    svc.metrics.count_webhook(action)
    try:
        event = WEBHOOK_EVENTS.get(action)
        if event is not None:
            check_body(event, payload)
        reply = svc.loop.webhooks.handle(payload, brush_max_pixels=svc.settings.brush_max_pixels)
    except RequestError as exc:
        log.warning("webhook %s refused: %s", action, exc)
        raise
    except WebhookError as exc:
        log.warning("webhook %s refused: %s", action, exc)
        return error_reply(exc.status, str(exc))
    return jsonify(status="ok", **reply)


@protocol.post("/train")
def train() -> Response:
    svc = services()
    project = svc.loader.connections.project_key(parse_body(TrainBody)["project"])
    if project is None:
        raise RequestError("field 'project' must name a project")
    reply = svc.loop.webhooks.handle({"action": "START_TRAINING", "project": {"id": project}})
    log.info("POST /train for project %s: %s", project, reply.get("training"))
    return jsonify(status="ok", **reply)


@protocol.get("/versions")
def versions() -> Response:
    svc = services()
    records = svc.loop.registry.versions()
    names = [r["version"] for r in records] or [svc.served.version]
    return jsonify(versions=names, current=svc.served.version, records=svc.paths.scrub(records))


@protocol.post("/rollback")
def rollback() -> Response:
    svc = services()
    version = parse_body(RollbackBody)["version"]
    try:
        record = svc.loop.rollback(version)
    except RegistryError as exc:
        return error_reply(404, svc.paths.scrub(str(exc)))
    except CheckpointError as exc:
        return error_reply(409, f"cannot roll back to {version}: {svc.paths.scrub(str(exc))}")
    return jsonify(status="ok", version=record["version"], serving=svc.served.version)


@protocol.get("/status")
def status() -> Response:
    svc = services()
    return jsonify(
        svc.paths.scrub(
            dict(
                status="UP",
                model_version=svc.served.version,
                model=svc.served.info(),
                pid=os.getpid(),
                uptime_s=round(time.time() - svc.started_at, 1),
                auth=svc.settings.auth_enabled,
                **svc.loop.status(),
            )
        )
    )


@protocol.get("/metrics")
def metrics() -> Response:
    svc = services()
    body, content_type = svc.metrics.render()
    return Response(body, content_type=content_type)
