"""The HTTP side of the backend: the Label Studio ML protocol, status and metrics.

Routes (``docs/label-studio.md`` has the protocol as Label Studio 1.23.2 calls it):

- ``GET /health``: JSON liveness with the served version (plain text fails the connection);
- ``POST /setup``: checks the project's label config against the served model, remembers the
  project's Label Studio host and token (for images), answers ``{"model_version"}``;
- ``POST /predict``: one entry per task, in order; tasks go through the model in batches; a task
  whose image fails gets an empty entry and the others are still predicted;
- ``POST /webhook``: acknowledges every action; annotation events become stored corrections,
  ``START_TRAINING`` and enough new corrections queue a fine-tuning job (``backend/loop.py``);
- ``GET /versions`` (the published versions), ``POST /rollback`` (serve an earlier one),
  ``GET /status`` (version, queue, job progress, last results), ``GET /metrics`` (Prometheus).

With ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set, every route needs HTTP basic auth. Label
Studio sends webhooks without it, so on /setup the backend adds the ``Authorization`` header to
the project webhook Label Studio created for it (``PATCH /api/webhooks/{id}``), using the
project's token; ``label_config/README.md`` gives the manual step for when that cannot work.

Bad input never becomes a 500: every body is checked against its model in ``backend/schemas.py``
before a handler reads it, so malformed JSON, missing fields, wrong types and out-of-range ids
are 400s whose JSON message names the field, and requests over a limit (``ABN_MAX_REQUEST_BYTES``,
``ABN_MAX_TASKS_PER_REQUEST``, ``ABN_BRUSH_MAX_PIXELS``) are 413s that name the setting. The
message is also put in the HTTP reason phrase, because that is the only part of an error reply
Label Studio shows its user. Replies show paths relative to MODEL_DIR (or file names only).
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.images import ImageFetchError, ImageLoader, LoadedImage
from backend.label_config import LabelConfigError, check_config, default_targets
from backend.label_studio import LabelStudioConnection
from backend.loop import TrainingLoop
from backend.metrics import Metrics
from backend.predictions import empty_prediction, to_label_studio
from backend.registry import RegistryError
from backend.schemas import (
    WEBHOOK_EVENTS,
    Body,
    BodyError,
    PredictBody,
    RollbackBody,
    SetupBody,
    WebhookBody,
    check,
)
from backend.serving import ServedModel, Snapshot
from backend.settings import Settings, SettingsError
from backend.webhooks import WebhookError
from model.checkpoint import CheckpointError

log = logging.getLogger(__name__)

FETCH_THREADS = 8
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods that label the request metrics as themselves; any other is counted as ``other``."""


class RequestError(ValueError):
    """A request the backend refuses with a 400 and this message."""


@dataclass
class BackendState:
    """Everything a request needs, built once per process by :func:`create_app`."""

    settings: Settings
    served: ServedModel
    loader: ImageLoader
    metrics: Metrics
    fetch_pool: ThreadPoolExecutor
    loop: TrainingLoop
    started_at: float = field(default_factory=time.time)
    webhook_auth: WebhookAuthorizer | None = None


def create_app(
    settings: Settings | None = None,
    served: ServedModel | None = None,
    loader: ImageLoader | None = None,
) -> Flask:
    """The Flask application; loads the model here (once per process) unless `served` is given."""
    settings = settings or Settings.from_env()
    if served is None:
        served = ServedModel.from_checkpoint(
            model_to_serve(settings), device=settings.device, batch_size=settings.batch_size
        )
    state = BackendState(
        settings=settings,
        served=served,
        loader=loader or ImageLoader(settings),
        metrics=Metrics(),
        fetch_pool=ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="abn-fetch"),
        loop=TrainingLoop(settings, served).start(),
    )
    if settings.auth_enabled:
        state.webhook_auth = WebhookAuthorizer(
            _basic_header(settings.basic_auth_user or "", settings.basic_auth_pass or "")
        )

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["abn"] = state
    paths = PathScrubber(settings.model_dir)

    @app.before_request
    def _before() -> Response | None:
        g.started = time.perf_counter()
        if settings.auth_enabled and not _authorized(settings):
            response = _error(401, "authentication required (HTTP basic auth)")
            response.headers["WWW-Authenticate"] = 'Basic realm="abn-backend"'
            return response
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        # Bounded label values: the app's own routes and the known methods, whatever was sent.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in HTTP_METHODS else "other"
        state.metrics.requests.labels(route, method, str(response.status_code)).inc()
        started = g.get("started")
        if started is not None:
            state.metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(RequestError)
    def _bad_request(exc: RequestError) -> Response:
        return _error(400, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            return _error(
                413,
                f"the request body is larger than ABN_MAX_REQUEST_BYTES="
                f"{settings.max_request_bytes} bytes",
            )
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="UP", model_class="ABN", model_version=state.served.version)

    @app.post("/setup")
    def setup() -> Response:
        body = _body(SetupBody)
        schema = body["schema"]
        project = body.get("project")
        hostname = body.get("hostname")
        token = body.get("access_token")
        snap = state.served.snapshot  # one read: the classes checked are the version answered
        try:
            check_config(schema, snap.classes)
        except LabelConfigError as exc:
            log.warning("setup refused for project %s: %s", project, exc)
            return _error(400, f"label config refused: {exc}")
        if hostname:
            if not re.match(r"^https?://[^\s/]+", hostname):
                raise RequestError(f"hostname must be an http(s) URL, got {hostname!r}")
            try:
                state.loader.connections.remember(
                    project, hostname, token, authenticated=settings.auth_enabled
                )
            except ValueError as exc:  # backend.images.HostRefused: names the setting
                log.warning("setup refused for project %s: %s", project, exc)
                return _error(getattr(exc, "status", 403), str(exc))
        if state.webhook_auth is not None:
            conn = state.loader.connection_for(project)
            key = state.loader.connections.project_key(project)
            if conn is not None and conn.token and key and key.isdigit():
                state.webhook_auth.ensure(conn, key, request.url_root.rstrip("/") + "/webhook")
        return jsonify(model_version=snap.version)

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        tasks = body.get("tasks")
        if isinstance(tasks, list) and len(tasks) > settings.max_tasks_per_request:
            message = (
                f"{len(tasks)} tasks in one request, more than ABN_MAX_TASKS_PER_REQUEST="
                f"{settings.max_tasks_per_request}; select fewer tasks at a time"
            )
            log.warning("/predict refused: %s", message)
            return _error(413, message)
        _check(PredictBody, body)
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
            return _error(400, f"label config refused: {exc}")
        results = predict_tasks(state, tasks, targets, snap, project)
        key = state.loader.connections.project_key(project)
        predicted = [t.get("id") for t, r in zip(tasks, results, strict=True) if r["result"]]
        if key and predicted and all(isinstance(t, int) for t in predicted):
            state.loop.store.record_predictions(key, predicted, snap.version)
        return jsonify(results=results, model_version=snap.version)

    @app.post("/webhook")
    def webhook() -> Response:
        payload = _body(WebhookBody)
        action = payload["action"]
        state.metrics.count_webhook(action)
        try:
            event = WEBHOOK_EVENTS.get(action)
            if event is not None:
                _check(event, payload)
            reply = state.loop.webhooks.handle(payload, brush_max_pixels=settings.brush_max_pixels)
        except RequestError as exc:
            log.warning("webhook %s refused: %s", action, exc)
            raise
        except WebhookError as exc:
            log.warning("webhook %s refused: %s", action, exc)
            return _error(exc.status, str(exc))
        return jsonify(status="ok", **reply)

    @app.get("/versions")
    def versions() -> Response:
        records = state.loop.registry.versions()
        names = [r["version"] for r in records] or [state.served.version]
        return jsonify(versions=names, current=state.served.version, records=paths.scrub(records))

    @app.post("/rollback")
    def rollback() -> Response:
        version = _body(RollbackBody)["version"]
        try:
            record = state.loop.rollback(version)
        except RegistryError as exc:
            return _error(404, paths.scrub(str(exc)))
        except CheckpointError as exc:
            return _error(409, f"cannot roll back to {version}: {paths.scrub(str(exc))}")
        return jsonify(status="ok", version=record["version"], serving=state.served.version)

    @app.get("/status")
    def status() -> Response:
        return jsonify(
            paths.scrub(
                dict(
                    status="UP",
                    model_version=state.served.version,
                    model=state.served.info(),
                    pid=os.getpid(),
                    uptime_s=round(time.time() - state.started_at, 1),
                    auth=settings.auth_enabled,
                    **state.loop.status(),
                )
            )
        )

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, content_type=content_type)

    return app


def model_to_serve(settings: Settings) -> Path:
    """The registry's current version if MODEL_DIR has published one, else the checkpoint.

    ``--checkpoint`` (``ABN_CHECKPOINT``) is the model served while MODEL_DIR holds no
    published version. (Following later publications while running is the hot-swap's job:
    :meth:`ServedModel.swap`.)
    """
    if settings.layout.registry_index.is_file():
        from backend.registry import ModelRegistry

        published = ModelRegistry(settings.model_dir).current_checkpoint()
        if published is not None:
            return published
    if settings.checkpoint is None:
        raise SettingsError(
            f"no model to serve: {settings.model_dir} has no published version; "
            "pass --checkpoint CKPT or set ABN_CHECKPOINT"
        )
    return settings.checkpoint


# ---------------------------------------------------------------------------- prediction


def predict_tasks(
    state: BackendState,
    tasks: list[dict[str, Any]],
    targets: Any,
    snap: Snapshot,
    project: object = None,
) -> list[dict[str, Any]]:
    """One Label Studio prediction per task, in order, all from snapshot `snap`.

    Tasks are handled a batch at a time (fetch the batch's images in parallel, one forward
    pass, encode), so memory stays bounded however many tasks a request carries. Tasks without
    an image are logged once per request, counted by reason, with the first of each reason.
    """
    settings = state.settings
    metrics = state.metrics
    results: list[dict[str, Any]] = [empty_prediction(snap.version) for _ in tasks]
    failed: Counter[str] = Counter()
    first_failure: dict[str, str] = {}
    batch = max(1, settings.batch_size)
    size = snap.meta.image_size
    for start in range(0, len(tasks), batch):
        chunk = list(enumerate(tasks[start : start + batch], start))
        started = time.perf_counter()
        if len(chunk) == 1:
            loaded = [_load_task_image(state, chunk[0][1], targets.data_key, project, size)]
        else:
            loaded = list(
                state.fetch_pool.map(
                    lambda item: _load_task_image(state, item[1], targets.data_key, project, size),
                    chunk,
                )
            )
        ready: list[tuple[int, LoadedImage]] = []
        for (index, task), outcome in zip(chunk, loaded, strict=True):
            if isinstance(outcome, ImageFetchError):
                metrics.count_error(outcome.reason)
                failed[outcome.reason] += 1
                if outcome.reason not in first_failure:
                    where = task.get("id", f"#{index}")
                    first_failure[outcome.reason] = f"task {where}: {outcome}"[:300]
                    bug = getattr(outcome, "bug", None)
                    if bug is not None:  # a loader bug: its traceback, once a request
                        log.error("%s", first_failure[outcome.reason], exc_info=bug)
            else:
                ready.append((index, outcome))
        fetched = time.perf_counter()
        metrics.stage_latency.labels("fetch").observe(fetched - started)
        if not ready:
            continue
        predictions = state.served.predict([img.image for _, img in ready], snapshot=snap)
        predicted = time.perf_counter()
        metrics.stage_latency.labels("model").observe(predicted - fetched)
        metrics.batch_latency.observe(predicted - fetched)
        metrics.batch_size.observe(len(ready))
        for (index, img), prediction in zip(ready, predictions, strict=True):
            results[index] = to_label_studio(
                prediction, img.width, img.height, targets, settings.brush_levels
            )
        metrics.stage_latency.labels("encode").observe(time.perf_counter() - predicted)
        metrics.predictions.labels(snap.version).inc(len(ready))
    if failed:
        log.warning(
            "/predict: %d of %d tasks got no prediction (%s); first of each: %s",
            sum(failed.values()),
            len(tasks),
            ", ".join(f"{reason} {count}" for reason, count in failed.most_common()),
            "; ".join(first_failure[reason] for reason, _ in failed.most_common()),
        )
    return results


def _load_task_image(
    state: BackendState, task: dict[str, Any], key: str, project: object, size: int
) -> LoadedImage | ImageFetchError:
    """The task's image, or the error that says why there is none (never raises).

    Only a copy at about the model's input `size` is kept, with the original width and height.
    """
    url = task["data"].get(key)
    if url is None:
        return ImageFetchError(f"task data has no {key!r} field", "missing")
    if not isinstance(url, str):
        return ImageFetchError(
            f"task data {key!r} must be a URL string, got {_type(url)}", "missing"
        )
    try:
        return state.loader.load(url, project, task.get("id"), size=size)
    except ImageFetchError as exc:
        return exc
    except Exception as exc:  # a loader bug must not sink the other tasks of the batch
        error = ImageFetchError(f"unexpected error: {type(exc).__name__}: {exc}", "internal")
        error.bug = exc  # type: ignore[attr-defined]  # predict_tasks logs the first traceback
        return error


# ---------------------------------------------------------------------------- webhooks


class WebhookAuthorizer:
    """Adds the backend's basic-auth header to the project webhook Label Studio made for it.

    Label Studio creates the webhook ``<backend url>/webhook`` only after the connection's
    first /setup succeeds, and sends it without auth; so this polls for it in a background
    thread (the /setup reply must not wait) and patches its headers once.
    """

    def __init__(self, header: str, attempts: int = 20, delay: float = 1.5) -> None:
        self.header = header
        self.attempts = attempts
        self.delay = delay
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def ensure(self, conn: LabelStudioConnection, project_id: str, webhook_url: str) -> None:
        """Start the background fix for this project and URL, once per process."""
        key = (conn.url, project_id, webhook_url)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        threading.Thread(
            target=self._run, args=(conn, project_id, webhook_url, key), daemon=True
        ).start()

    def _run(
        self, conn: LabelStudioConnection, project_id: str, url: str, key: tuple[str, str, str]
    ) -> None:
        try:
            for _ in range(self.attempts):
                if self.authorize(conn, project_id, url):
                    return
                time.sleep(self.delay)
            log.warning(
                "no webhook %s found in project %s: add the header Authorization: Basic ... "
                "to it by hand (label_config/README.md)",
                url,
                project_id,
            )
        except Exception as exc:
            log.warning("cannot add auth to the webhook of project %s: %s", project_id, exc)
        with self._lock:  # let a later /setup try again
            self._seen.discard(key)

    def authorize(self, conn: LabelStudioConnection, project_id: str, url: str) -> bool:
        """Patch the webhook whose URL is `url`; True when it is done (or already was)."""
        headers = {**conn.auth_header(), "Content-Type": "application/json"}
        listing = requests.get(
            f"{conn.url}/api/webhooks/", params={"project": project_id}, headers=headers, timeout=5
        )
        listing.raise_for_status()
        hooks = listing.json()
        if isinstance(hooks, dict):
            hooks = hooks.get("results", [])
        want = url.rstrip("/")
        done = False
        for hook in hooks:
            if not isinstance(hook, dict) or str(hook.get("url", "")).rstrip("/") != want:
                continue
            current = hook.get("headers") or {}
            if current.get("Authorization") != self.header:
                patched = requests.patch(
                    f"{conn.url}/api/webhooks/{hook['id']}/",
                    headers=headers,
                    data=json.dumps({"headers": {**current, "Authorization": self.header}}),
                    timeout=5,
                )
                patched.raise_for_status()
                log.info("added basic auth to webhook %s of project %s", want, project_id)
            done = True
        return done


# ---------------------------------------------------------------------------- helpers


def _authorized(settings: Settings) -> bool:
    """Constant-time check of both user and password (both are compared, always)."""
    auth = request.authorization
    user = (auth.username or "") if auth and auth.type == "basic" else ""
    password = (auth.password or "") if auth and auth.type == "basic" else ""
    ok_user = hmac.compare_digest(user.encode(), (settings.basic_auth_user or "").encode())
    ok_pass = hmac.compare_digest(password.encode(), (settings.basic_auth_pass or "").encode())
    return ok_user and ok_pass


def _basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _error(status: int, message: str) -> Response:
    """A JSON error whose HTTP reason phrase repeats the message (Label Studio shows only that)."""
    response = jsonify(error=message, status=status)
    reason = re.sub(r"[^\x20-\x7e]", "?", message)[:300]
    response.status = f"{status} {reason}" if reason else str(status)
    return response


def _read_body() -> bytes | bytearray:
    """The whole body, however it is framed, or a 413 when it is over the limit.

    With a Content-Length, werkzeug refuses a body over the limit before reading it. A chunked
    body has no length: werkzeug reads it up to the limit and silently stops there, so the cut
    body looked like malformed JSON (a 400). Here one byte more than the limit is asked for, and
    getting it is the 413 it should be.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None or "wsgi.input_terminated" not in request.environ:
        return request.get_data(cache=False)
    stream = request.environ["wsgi.input"]
    body = bytearray()
    while len(body) <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > limit:
        raise RequestEntityTooLarge()
    return body


_READ_CHUNK = 1 << 16


def _json_object() -> dict[str, Any]:
    """The body as a JSON object, or a RequestError that says what is wrong with it."""
    raw = _read_body()
    if not raw:
        raise RequestError("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {_type(body)}")
    return body


def _body(model: type[Body]) -> dict[str, Any]:
    """The body as a JSON object of the shape `model` declares (``backend/schemas.py``)."""
    body = _json_object()
    _check(model, body)
    return body


def _check(model: type[Body], body: dict[str, Any]) -> None:
    try:
        check(model, body)
    except BodyError as exc:
        raise RequestError(str(exc)) from None


class PathScrubber:
    """Paths as replies show them: relative to MODEL_DIR, or only the file name.

    Absolute paths say how the host is laid out (user names, mount points) to anyone who can
    call /status or /rollback, and help no caller.
    """

    _PART = r"[^\s/'\"()\[\]{}<>,;:]+"  # one path component
    _ABSOLUTE = re.compile(rf"(?<![\w/.:~-])/(?:{_PART}/)+({_PART})")

    def __init__(self, model_dir: Path) -> None:
        forms = {str(model_dir), str(model_dir.absolute()), str(model_dir.resolve())}
        self.prefixes = sorted((f.rstrip("/") + "/" for f in forms if f not in ("", ".")), key=len)
        self.prefixes.reverse()  # longest first

    def scrub(self, value: Any) -> Any:
        """`value` with every path in its strings made relative (JSON values: dicts, lists)."""
        if isinstance(value, str):
            for prefix in self.prefixes:
                value = value.replace(prefix, "")
            return self._ABSOLUTE.sub(r"\1", value)
        if isinstance(value, dict):
            return {key: self.scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(item) for item in value]
        return value


def _type(value: object) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------- gunicorn


def prepare_to_serve(settings: Settings) -> Path:
    """Publish the checkpoint on a first start, and check the model to serve, once.

    Run by :func:`serve` in a fresh process before gunicorn forks; failing here, once, is
    clearer than failing in every worker.
    """
    from backend.registry import ModelRegistry
    from model.checkpoint import read_checkpoint

    if settings.checkpoint is not None:
        record, published = ModelRegistry(settings.model_dir).publish_initial(settings.checkpoint)
        if published:
            log.info("published %s as %s", settings.checkpoint, record["version"])
    source = model_to_serve(settings)
    meta, _ = read_checkpoint(source)
    if meta.get("kind") != "abn":
        raise SettingsError(f"{source} is a {meta.get('kind')!r} checkpoint; serving needs an ABN")
    return source


def serve(
    host: str = "127.0.0.1",
    port: int = 9090,
    checkpoint: str | Path | None = None,
    workers: int = 1,
    *,
    threads: int = 4,
    timeout: int = 300,
    settings: Settings | None = None,
) -> None:
    """Run the backend under gunicorn (``abn serve``); blocks until gunicorn exits.

    Each worker builds its own app, so the model is loaded once per worker process, after the
    fork (no torch state is shared across a fork). With several workers, Prometheus metrics go
    through a multiprocess folder so that /metrics sums all workers.
    """
    from gunicorn.app.base import BaseApplication

    from backend import metrics as metrics_mod
    from backend.isolation import run_in_fresh_process

    settings = settings or Settings.from_env()
    if checkpoint is not None:
        settings = settings.replace(checkpoint=Path(checkpoint))
    settings.check_exposure(host)
    # This process forks the workers, so it must not run torch itself (backend/isolation.py).
    source = run_in_fresh_process(prepare_to_serve, settings)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )

    workers = max(1, int(workers))
    metrics_dir = None
    if workers > 1 and not metrics_mod.multiprocess_dir():
        # Under MODEL_DIR, not /tmp: a master killed with SIGKILL cannot remove its folder, so
        # the next start removes the folders of masters that are gone.
        metrics_dir = metrics_mod.make_multiprocess_dir(settings.layout.metrics)
        metrics_mod.enable_multiprocess(str(metrics_dir))
    torch_threads = max(1, (os.cpu_count() or 1) // workers)

    def post_fork(server: Any, worker: Any) -> None:
        import torch

        torch.set_num_threads(torch_threads)

    def child_exit(server: Any, worker: Any) -> None:
        metrics_mod.mark_worker_dead(worker.pid)

    def on_exit(server: Any) -> None:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = {
        "bind": bind,
        "workers": workers,
        "worker_class": "gthread",
        "threads": max(1, int(threads)),
        "timeout": timeout,
        "graceful_timeout": 30,
        "post_fork": post_fork,
        "child_exit": child_exit,
        "on_exit": on_exit,
    }

    class _Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return create_app(settings)

    log.info("serving %s on %s with %d worker(s)", source, bind, workers)
    _Application().run()
