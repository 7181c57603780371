"""Label Studio's webhook events, turned into stored corrections and training requests.

Label Studio sends each event once, with a one-second timeout and no retry, so the handler only
validates, stores (durably) and enqueues; it never trains. Every action it does not need is
acknowledged and ignored: connecting an ML backend subscribes it to all of them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from backend.corrections import CorrectionError, correction_from_annotation
from backend.jobs import TrainingQueue
from backend.label_config import LabelConfigError
from backend.label_studio import ProjectConnections
from backend.project_models import ProjectModels
from backend.schemas import MAX_ID
from backend.store import LoopStore

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}


class WebhookError(ValueError):
    """A payload that cannot be used; answered with `status` (a 4xx) and nothing stored."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class WebhookHandler:
    store: LoopStore
    queue: TrainingQueue | None  # None: no Redis configured; requests wait in the store
    models: ProjectModels  # targets take the project model's classes and map size
    train_after: int  # new edited corrections that start a round
    train_first_after: int = 0  # labelled tasks that start a first model (0: never by count)

    def handle(self, payload: Any, *, brush_max_pixels: int | None = None) -> dict[str, Any]:
        """Act on one event; returns the JSON acknowledgement.

        The route checks the body against ``backend/schemas.py`` first; what is checked here
        again is only what would otherwise crash. A brush larger than `brush_max_pixels` is
        refused with a 413 before it is decoded.
        """
        if not isinstance(payload, dict) or not isinstance(payload.get("action"), str):
            raise WebhookError('a webhook body must be a JSON object with an "action" string')
        action = payload["action"]
        if action in ANNOTATION_EVENTS:
            return self._annotation(payload, brush_max_pixels)
        if action == "ANNOTATIONS_DELETED":
            return self._deleted(payload)
        if action == "START_TRAINING":
            project = project_id(payload)
            self._remember_config(project, payload)
            return {"action": action, "training": self._request(project, "START_TRAINING")}
        if action == "PROJECT_DELETED":
            project = project_id(payload)
            self.store.clear_request(project)  # its tasks are gone: nothing left to train on
            log.info(
                "project %s was deleted in Label Studio; its models stay in MODEL_DIR", project
            )
            return {"action": action, "forgotten": True}
        return {"action": action, "ignored": True}

    def _remember_config(self, project: str, payload: dict[str, Any]) -> str | None:
        """The event's label config, kept for the worker (a first model learns its classes)."""
        ref = payload.get("project")
        config = ref.get("label_config") if isinstance(ref, dict) else None
        if config is not None and not isinstance(config, str):
            raise WebhookError("project.label_config must be a string")
        if config:
            self.store.remember_label_config(project, config)
        return config

    def _annotation(self, payload: dict[str, Any], brush_max_pixels: int | None) -> dict[str, Any]:
        project = project_id(payload)
        annotation, task = payload.get("annotation"), payload.get("task")
        if not isinstance(annotation, dict) or not _is_id(annotation.get("id")):
            raise WebhookError("annotation.id (an integer) is missing")
        if not isinstance(task, dict) or not _is_id(task.get("id")):
            raise WebhookError("task.id (an integer) is missing")
        config = self._remember_config(project, payload)
        try:
            resolved = self.models.resolve(project, config)
            if resolved.targets is None:
                raise LabelConfigError(
                    f"{resolved.reason}; and the event carries no project.label_config to read "
                    "its classes from"
                )
            correction = correction_from_annotation(
                project,
                annotation,
                task,
                resolved.targets,
                self.models.map_size(resolved),
                max_pixels=brush_max_pixels,
            )
        except (CorrectionError, LabelConfigError, ValueError) as exc:
            status = exc.status if isinstance(exc, CorrectionError) else 400
            raise WebhookError(f"annotation {annotation['id']}: {exc}", status) from exc
        if correction is None:
            return {
                "action": payload["action"],
                "stored": False,
                "reason": "neither an attention brush nor a class",
            }
        if correction.model_version is None:
            version = self.store.predicted_version(project, correction.task_id)
            correction = dataclasses.replace(correction, model_version=version)
        changed = self.store.put(correction)
        reply = {"action": payload["action"], "stored": changed, "edited": correction.edited}
        if resolved.snapshot is None:  # a project with no model yet: labels make its first
            labelled = self.store.labelled_count(project)
            reply["labelled"] = labelled
            if changed and self.train_first_after and labelled >= self.train_first_after:
                reply["training"] = self._request(project, f"{labelled} labelled tasks")
            return reply
        pending = self.store.untrained_count(project)
        reply["untrained_corrections"] = pending
        if changed and correction.edited and pending >= self.train_after:
            reply["training"] = self._request(project, f"{pending} new corrections")
        return reply

    def _deleted(self, payload: dict[str, Any]) -> dict[str, Any]:
        project = project_id(payload)
        annotations = payload.get("annotations")
        if not isinstance(annotations, list) or not all(
            isinstance(a, dict) and _is_id(a.get("id")) for a in annotations
        ):
            raise WebhookError('"annotations" must be a list of {"id": <integer>}')
        removed = self.store.delete(project, [a["id"] for a in annotations])
        return {"action": payload["action"], "removed": removed}

    def _request(self, project: str, reason: str) -> str:
        if self.queue is None:
            self.store.request_training(project, reason)
            return "deferred"
        return self.queue.request(project, reason)


def project_id(payload: dict[str, Any]) -> str:
    """The project's key, as /setup and /predict name it (it names files under MODEL_DIR)."""
    project = payload.get("project")
    value = project.get("id") if isinstance(project, dict) else project
    key = None
    if isinstance(value, int | str) and not isinstance(value, bool):
        key = ProjectConnections.project_key(value)
    if key is None:
        raise WebhookError("project.id is missing")
    return key


def _is_id(value: object) -> bool:
    """An id the store can hold: an integer (not a boolean) in SQLite's 0..2**63-1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID
