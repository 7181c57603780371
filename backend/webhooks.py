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

from backend.corrections import CorrectionError, CorrectionStore, correction_from_annotation
from backend.jobs import TrainingQueue
from backend.label_config import LabelConfigError, default_targets, targets_for
from backend.serving import ServedModel
from model.maps import map_size_for

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}


class WebhookError(ValueError):
    """A payload that cannot be used; answered with a 4xx and nothing stored."""


@dataclass
class WebhookHandler:
    store: CorrectionStore
    queue: TrainingQueue | None  # None: no Redis configured; requests wait in the store
    served: ServedModel  # targets take the served model's classes and map size
    train_after: int

    def handle(self, payload: Any) -> dict[str, Any]:
        """Act on one event; returns the JSON acknowledgement."""
        if not isinstance(payload, dict) or not isinstance(payload.get("action"), str):
            raise WebhookError('a webhook body must be a JSON object with an "action" string')
        action = payload["action"]
        if action in ANNOTATION_EVENTS:
            return self._annotation(payload)
        if action == "ANNOTATIONS_DELETED":
            return self._deleted(payload)
        if action == "START_TRAINING":
            project = project_id(payload)
            return {"action": action, "training": self._request(project, "START_TRAINING")}
        return {"action": action, "ignored": True}

    def _annotation(self, payload: dict[str, Any]) -> dict[str, Any]:
        project = project_id(payload)
        annotation, task = payload.get("annotation"), payload.get("task")
        if not isinstance(annotation, dict) or not isinstance(annotation.get("id"), int):
            raise WebhookError("annotation.id (an integer) is missing")
        if not isinstance(task, dict) or not isinstance(task.get("id"), int):
            raise WebhookError("task.id (an integer) is missing")
        config = (payload.get("project") or {}).get("label_config")
        snap = self.served.snapshot
        try:
            targets = (
                targets_for(config, tuple(snap.classes))
                if config
                else default_targets(snap.classes)
            )
            side = map_size_for(int(snap.meta["image_size"]))
            correction = correction_from_annotation(project, annotation, task, targets, side)
        except (CorrectionError, LabelConfigError, ValueError) as exc:
            raise WebhookError(f"annotation {annotation['id']}: {exc}") from exc
        if correction is None:
            return {"action": payload["action"], "stored": False, "reason": "no attention brush"}
        if correction.model_version is None:
            version = self.store.predicted_version(project, correction.task_id)
            correction = dataclasses.replace(correction, model_version=version)
        changed = self.store.put(correction)
        reply = {"action": payload["action"], "stored": changed, "edited": correction.edited}
        pending = self.store.untrained_count(project)
        reply["untrained_corrections"] = pending
        if changed and correction.edited and pending >= self.train_after:
            reply["training"] = self._request(project, f"{pending} new corrections")
        return reply

    def _deleted(self, payload: dict[str, Any]) -> dict[str, Any]:
        project = project_id(payload)
        annotations = payload.get("annotations")
        if not isinstance(annotations, list) or not all(
            isinstance(a, dict) and isinstance(a.get("id"), int) for a in annotations
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
    project = payload.get("project")
    value = project.get("id") if isinstance(project, dict) else project
    if not isinstance(value, int | str) or isinstance(value, bool) or str(value) == "":
        raise WebhookError("project.id is missing")
    return str(value)
