""" "Check my map" (``docs/loop.md``, section 5): the top-3 the served model gives with the map
the annotator is drawing, as the paper's editor shows it while a map is edited.

Label Studio 1.23.2 sends a backend nothing while a brush is edited; it autosaves the user's
draft. A point of the config's smart check control (a ``<KeyPointLabels>`` with the label
``Check my map``) calls ``POST /api/ml/{id}/interactive-annotating``, which calls ``/predict``
with ``params.context`` holding that point and the task carrying the calling user's drafts.
The answer: the latest draft's attention brushes, merged and averaged down to the model's map
exactly as a submitted annotation's (``backend/corrections.py``), gate the served version's
perception branch in place of its own map (``model/edited_map.py``); the top-3 it then gives,
and the model's own for comparison, go into the config's top-3 ``<TextArea>``. The editor
takes a text result at once: it is no region to accept or reject.

A task with no draft, or whose draft holds no attention brush, gets lines that say so, with
the model's own top-3; an image that cannot be loaded gets the line that says why. A draft
whose brush cannot be a mask (a stream that is not the size it declares, brushes of two
sizes, more than ``ABN_BRUSH_MAX_PIXELS``) is refused as ``/webhook`` refuses it, with a 400 or
a 413, before the image is fetched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from backend.corrections import Correction, correction_from_annotation, most_recent
from backend.images import ImageFetchError
from backend.label_config import Targets
from backend.predictions import TaskPredictor, top3_lines, top3_result
from backend.schemas import PredictParams
from backend.serving import Prediction, ServedModel, Snapshot
from model.maps import map_size_for

log = logging.getLogger(__name__)

CHECK_TYPE = "keypointlabels"
OUTCOMES = ("checked", "no_draft", "no_brush", "no_image", "no_model", "refused")
"""How a check ends, as ``abn_map_checks_total`` counts it."""


@dataclass(frozen=True)
class MapCheck:
    """What one check answers: the lines for the top-3 box, why, and the score to show."""

    outcome: str  # one of OUTCOMES
    lines: list[str]
    score: float = 0.0


def asks_for_check(params: PredictParams | None, targets: Targets | None) -> bool:
    """Whether a /predict is a check: its context holds a point of the config's check control.

    Any other context (another smart tool, a config without the control) is predicted as
    before, so a project without the control works as it did."""
    context = params.context if params is not None else None
    if context is None or targets is None or targets.check is None:
        return False
    return any(r.type == CHECK_TYPE and r.from_name == targets.check for r in context.result or [])


def drafted_map(
    task: dict[str, Any], targets: Targets, snap: Snapshot, max_pixels: int
) -> tuple[bool, Correction | None]:
    """Whether the task carries a draft, and its latest draft as ``/webhook`` reads an
    annotation (None: it has neither an attention brush nor a class).

    Raises :class:`~backend.corrections.CorrectionError` for a brush that cannot be used."""
    draft = most_recent(task.get("drafts") or [])
    if draft is None:
        return False, None
    size = map_size_for(snap.meta.image_size)
    return True, correction_from_annotation("", draft, task, targets, size, max_pixels=max_pixels)


def check_task(
    predictor: TaskPredictor,
    task: dict[str, Any],
    targets: Targets,
    snap: Snapshot,
    project: object,
    max_pixels: int,
) -> MapCheck:
    """The check of one task with `snap`, the version that serves its project now."""
    has_draft, correction = drafted_map(task, targets, snap, max_pixels)
    loaded = predictor.load_task_image(task, targets.data_key, project, snap.meta.image_size)
    if isinstance(loaded, ImageFetchError):
        return MapCheck("no_image", [f"Cannot check your map: the image did not load ({loaded})"])
    (own,) = ServedModel.predict_with(snap, [loaded.image])
    if not has_draft:
        return MapCheck("no_draft", [*NO_DRAFT, own_line(own)], own.score)
    if correction is None or correction.target is None:
        text = f"Nothing to check: your draft has no {targets.label} brush."
        return MapCheck("no_brush", [text, own_line(own)], own.score)
    edited = ServedModel.predict_with_map(snap, loaded.image, correction.target)
    unedited = "" if correction.edited else " (the model's own, unedited)"
    head = f"With your map{unedited} the model says {edited.label}:"
    return MapCheck("checked", [head, *top3_lines(edited), own_line(own)], edited.top[0][1])


NO_DRAFT = [
    "Nothing to check yet: Label Studio has saved no draft of yours for this task.",
    "Edit the brush, wait until the draft is saved (a few seconds), then click again.",
]


def own_line(own: Prediction) -> str:
    """The model's own top-3 on one line, to compare with."""
    return "With its own map: " + "   ".join(top3_lines(own))


def check_entry(check: MapCheck, targets: Targets, version: str) -> dict[str, Any]:
    """The /predict entry the editor loads as its suggestion: the lines in the top-3 box."""
    return {
        "result": [top3_result(check.lines, targets, check.score)],
        "score": check.score,
        "model_version": version,
    }
