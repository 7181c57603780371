"""What one serving process holds for its requests, built once by the app factory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import current_app

from backend.images import ImageLoader
from backend.label_studio import WebhookAuthorizer
from backend.loop import ServingLoop
from backend.predictions import TaskPredictor
from backend.project_models import ProjectModels
from backend.prometheus import Metrics
from backend.request_io import PathScrubber
from backend.settings import Settings


@dataclass
class BackendServices:
    """The served models, the image loader, the loop and the metrics of one process."""

    settings: Settings
    models: ProjectModels
    loader: ImageLoader
    metrics: Metrics
    predictor: TaskPredictor
    loop: ServingLoop
    paths: PathScrubber
    webhook_auth: WebhookAuthorizer | None = None  # with basic auth: fixes Label Studio's webhook
    started_at: float = field(default_factory=time.time)


EXTENSION = "abn"


def services() -> BackendServices:
    """The current app's services (inside a request)."""
    return current_app.extensions[EXTENSION]
