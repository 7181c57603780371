"""The routes: the Label Studio ML protocol, plus status, versions, rollback and metrics.

- ``GET /health``: JSON liveness with the shared model's version (plain text fails the
  connection);
- ``POST /setup``: checks the project's label config against the project's model (its own, the
  shared one, or none yet: ``backend/project_models.py``), remembers the project's Label Studio
  host and token (for images) and its label config, answers ``{"model_version"}``;
- ``POST /predict``: one entry per task, in order; tasks go through the project's model in
  batches; a task whose image fails gets an empty entry and the others are still predicted; a
  project with no model yet gets empty entries and a ``message`` that says why; a context
  holding a point of the config's check control is "check my map" (``backend/map_check.py``);
- ``POST /webhook``: acknowledges every action; annotation events become stored corrections,
  ``START_TRAINING`` and enough new corrections queue a fine-tuning job (``backend/loop.py``);
- ``POST /train``: what Label Studio calls when its START_TRAINING webhook is off (the
  "Start model training on annotation submission" toggle): the same as that webhook;
- ``GET /versions`` (the published versions of every lineage; ``?project=`` one project's),
  ``POST /rollback`` (serve an earlier one of its lineage), ``GET /status`` (versions, queue,
  job progress, last results; ``?project=`` one project's), ``GET /metrics`` (Prometheus).

Each route reads the process's services (``backend/services.py``) and only does I/O around
them. Requests over a limit (``ABN_MAX_REQUEST_BYTES``, ``ABN_MAX_TASKS_PER_REQUEST``,
``ABN_BRUSH_MAX_PIXELS``) are 413s that name the setting; replies show paths relative to
MODEL_DIR (or file names only).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

from backend.corrections import CorrectionError
from backend.label_config import LabelConfigError
from backend.label_studio import HostRefused
from backend.map_check import MapCheck, asks_for_check, check_entry, check_task
from backend.predictions import empty_prediction
from backend.project_models import ProjectModel
from backend.registry import RegistryError, all_versions, lineage_of
from backend.request_io import (
    RequestError,
    check_body,
    error_reply,
    json_object,
    parse_body,
)
from backend.schemas import (
    WEBHOOK_EVENTS,
    CheckBody,
    PredictBody,
    PredictParams,
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
    """Always 200 while the backend serves (Label Studio fails the connection otherwise);
    ``degraded`` lists what does not work now (Redis away: training requests wait)."""
    svc = services()
    shared = svc.models.shared_model
    reply = {"status": "UP", "model_class": "ABN", "model_version": shared and shared.version}
    degraded = svc.loop.degraded()
    if degraded:
        reply["degraded"] = svc.paths.scrub(degraded)
    return jsonify(reply)


def resolve(project: object, config: str | None) -> ProjectModel | Response:
    """The project's model for this request, or the 400 that says why the config is refused."""
    svc = services()
    key = svc.loader.connections.project_key(project)
    try:
        return svc.models.resolve(key, config)
    except LabelConfigError as exc:
        log.warning("label config of project %s refused: %s", key, exc)
        return error_reply(400, f"label config refused: {exc}")


@protocol.post("/setup")
def setup() -> Response:
    svc = services()
    body = parse_body(SetupBody)
    schema = body["schema"]
    project = body.get("project")
    hostname = body.get("hostname")
    token = body.get("access_token")
    resolved = resolve(project, schema)
    if isinstance(resolved, Response):
        return resolved
    if hostname:
        try:
            svc.loader.connections.remember(
                project, hostname, token, authenticated=svc.settings.auth_enabled
            )
        except HostRefused as exc:  # the message names the setting
            log.warning("setup refused for project %s: %s", project, exc)
            return error_reply(exc.status, str(exc))
    key = svc.loader.connections.project_key(project)
    if key is not None:
        svc.loop.store.remember_label_config(key, schema)
    if svc.webhook_auth is not None:
        conn = svc.loader.connection_for(project)
        if conn is not None and conn.token and key and key.isdigit():
            svc.webhook_auth.ensure(conn, key, request.url_root.rstrip("/") + "/webhook")
    if resolved.reason:
        log.info("/setup: %s", resolved.reason)
        return jsonify(model_version=resolved.version, message=resolved.reason)
    return jsonify(model_version=resolved.version)


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
    project = body.get("project")
    resolved = resolve(project, body.get("label_config"))
    if isinstance(resolved, Response):
        return resolved
    params = body.get("params")
    if asks_for_check(PredictParams.model_validate(params) if params else None, resolved.targets):
        return map_check(body, resolved)
    snap = resolved.snapshot
    if snap is None or resolved.targets is None:
        log.info("/predict: %d task(s) left empty: %s", len(tasks), resolved.reason)
        return jsonify(
            results=[empty_prediction(resolved.version) for _ in tasks],
            model_version=resolved.version,
            message=resolved.reason,
        )
    results = svc.predictor.predict(tasks, resolved.targets, snap, project)
    key = svc.loader.connections.project_key(project)
    predicted = [t.get("id") for t, r in zip(tasks, results, strict=True) if r["result"]]
    if key and predicted and all(isinstance(t, int) for t in predicted):
        svc.loop.store.record_predictions(key, predicted, snap.version)
    return jsonify(results=results, model_version=snap.version)


def map_check(body: dict[str, Any], resolved: ProjectModel) -> Response:
    """ "Check my map" (``backend/map_check.py``): one task, answered with the top-3 box's lines;
    a draft whose brush cannot be used is refused as ``/webhook`` refuses it."""
    svc = services()
    check_body(CheckBody, body)
    tasks = body["tasks"]
    if len(tasks) != 1:
        raise RequestError(
            f"a map check is about one task (the one the editor shows), got {len(tasks)}"
        )
    [task] = tasks
    targets, snap = resolved.targets, resolved.snapshot
    assert targets is not None  # asks_for_check found the check control in them
    if snap is None:
        check = MapCheck("no_model", [f"No model to check your map with: {resolved.reason}"])
    else:
        try:
            check = check_task(
                svc.predictor,
                task,
                targets,
                snap,
                body.get("project"),
                svc.settings.brush_max_pixels,
            )
        except CorrectionError as exc:
            svc.metrics.map_checks.labels("refused").inc()
            log.warning("map check of task %s refused: %s", task["id"], exc)
            return error_reply(exc.status, f"map check of task {task['id']}: {exc}")
    svc.metrics.map_checks.labels(check.outcome).inc()
    log.info("map check of task %s with %s: %s", task["id"], resolved.version, check.lines[0])
    return jsonify(
        results=[check_entry(check, targets, resolved.version)], model_version=resolved.version
    )


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
    body = parse_body(TrainBody)
    project = svc.loader.connections.project_key(body["project"])
    if project is None:
        raise RequestError("field 'project' must name a project")
    event = {"id": project, "label_config": body.get("label_config")}
    reply = svc.loop.webhooks.handle({"action": "START_TRAINING", "project": event})
    log.info("POST /train for project %s: %s", project, reply.get("training"))
    return jsonify(status="ok", **reply)


def project_arg() -> str | None:
    """``?project=`` as a project key (``12`` or ``12.1700000000``), or None."""
    raw = request.args.get("project")
    if raw is None:
        return None
    key = services().loader.connections.project_key(raw)
    if key is None:
        raise RequestError("query parameter 'project' must name a project")
    return key


@protocol.get("/versions")
def versions() -> Response:
    svc = services()
    project = project_arg()
    records = all_versions(svc.settings.model_dir)
    if project is not None:
        records = [r for r in records if lineage_of(r["version"]) == project]
    shared = svc.models.shared_model
    current = svc.models.resolve(project, None).version if project else (shared and shared.version)
    names = [r["version"] for r in records]
    if not records and shared is not None and project is None:
        names = [shared.version]  # a plain --checkpoint, not published
    return jsonify(versions=names, current=current, records=svc.paths.scrub(records))


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
    return jsonify(status="ok", version=record["version"], serving=serving_version(version))


def serving_version(version: str) -> str | None:
    """What this process serves now in the lineage of `version`."""
    models = services().models
    project = lineage_of(version)
    if project is not None:
        return models.resolve(project, None).version
    return models.shared_model.version if models.shared_model else None


@protocol.get("/status")
def status() -> Response:
    svc = services()
    project = project_arg()
    shared = svc.models.shared_model
    reply = dict(
        status="UP",
        model_version=shared.version if shared else None,
        model=svc.models.info(),
        pid=os.getpid(),
        uptime_s=round(time.time() - svc.started_at, 1),
        auth=svc.settings.auth_enabled,
        project_models=svc.models.loaded(),
        degraded=svc.loop.degraded(),
    )
    if project is not None:
        reply["project"] = project_status(project)
    return jsonify(svc.paths.scrub({**reply, **svc.loop.status(project)}))


def project_status(project: str) -> dict[str, object]:
    """What serves `project` now, as /status shows it."""
    svc = services()
    try:
        resolved = svc.models.resolve(project, svc.loop.store.label_config(project))
    except LabelConfigError as exc:
        return {"id": project, "model_version": None, "reason": f"label config refused: {exc}"}
    return {
        "id": project,
        "model_version": resolved.version,
        "own_model": resolved.own,
        "classes": resolved.snapshot.classes if resolved.snapshot else None,
        "reason": resolved.reason,
    }


@protocol.get("/metrics")
def metrics() -> Response:
    svc = services()
    body, content_type = svc.metrics.render()
    return Response(body, content_type=content_type)
