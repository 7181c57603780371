"""The Flask application factory: one app per serving process.

:func:`create_app` loads the model (once per process, unless given one), builds the process's
services (``backend/services.py``), installs the hooks every request passes through (basic auth
when ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` are set, request metrics with bounded labels) and
the error handlers (every error is a JSON reply whose message is repeated in the reason phrase;
an unexpected exception is logged and answered 500 without its details), and registers the
routes (``backend/routes.py``). ``docs/label-studio.md`` has the protocol as Label Studio 1.23.2
calls it; ``docs/architecture.md`` the whole picture.
"""

from __future__ import annotations

import hmac
import logging
import time

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.images import ImageLoader
from backend.label_studio import WebhookAuthorizer, basic_header
from backend.loop import ServingLoop
from backend.predictions import TaskPredictor
from backend.project_models import ProjectModels
from backend.prometheus import Metrics
from backend.registry import shared_model_path
from backend.request_io import PathScrubber, RequestError, error_reply
from backend.round_routes import rounds
from backend.routes import protocol
from backend.services import EXTENSION, BackendServices
from backend.serving import ServedModel
from backend.settings import Settings

log = logging.getLogger(__name__)

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods that label the request metrics as themselves; any other is counted as ``other``."""


def create_app(
    settings: Settings | None = None,
    served: ServedModel | None = None,
    loader: ImageLoader | None = None,
) -> Flask:
    """The Flask application; loads the shared model here (once per process, if there is one)
    unless `served` is given. Project models load on first use."""
    settings = settings or Settings.from_env()
    if served is None:
        path = shared_model_path(settings)
        if path is not None:
            served = ServedModel.from_checkpoint(
                path, device=settings.device, batch_size=settings.batch_size
            )
    models = ProjectModels(settings, served)
    loader = loader or ImageLoader(settings)
    metrics = Metrics()
    svc = BackendServices(
        settings=settings,
        models=models,
        loader=loader,
        metrics=metrics,
        predictor=TaskPredictor(
            loader,
            metrics,
            settings.batch_size,
            settings.brush_levels,
            brush_floor=settings.brush_floor,
        ),
        loop=ServingLoop(settings, models).start(),
        paths=PathScrubber(settings.model_dir),
    )
    if settings.auth_enabled:
        svc.webhook_auth = WebhookAuthorizer(
            basic_header(settings.basic_auth_user or "", settings.basic_auth_pass or "")
        )

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = svc

    @app.before_request
    def _before() -> Response | None:
        g.started = time.perf_counter()
        if settings.auth_enabled and not _authorized(settings):
            response = error_reply(401, "authentication required (HTTP basic auth)")
            response.headers["WWW-Authenticate"] = 'Basic realm="abn-backend"'
            return response
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        # Bounded label values: the app's own routes and the known methods, whatever was sent.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in HTTP_METHODS else "other"
        metrics.requests.labels(route, method, str(response.status_code)).inc()
        started = g.get("started")
        if started is not None:
            metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(RequestError)
    def _bad_request(exc: RequestError) -> Response:
        return error_reply(400, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            return error_reply(
                413,
                f"the request body is larger than ABN_MAX_REQUEST_BYTES="
                f"{settings.max_request_bytes} bytes",
            )
        return error_reply(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_reply(500, f"internal error: {type(exc).__name__}")

    app.register_blueprint(protocol)
    app.register_blueprint(rounds)
    return app


def _authorized(settings: Settings) -> bool:
    """Constant-time check of both user and password (both are compared, always)."""
    auth = request.authorization
    user = (auth.username or "") if auth and auth.type == "basic" else ""
    password = (auth.password or "") if auth and auth.type == "basic" else ""
    ok_user = hmac.compare_digest(user.encode(), (settings.basic_auth_user or "").encode())
    ok_pass = hmac.compare_digest(password.encode(), (settings.basic_auth_pass or "").encode())
    return ok_user and ok_pass
