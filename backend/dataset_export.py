"""``abn dataset --from-label-studio``: a project's annotations as a dataset on disk.

Writes the layout every offline command reads (``abn train``, ``finetune``, ``evaluate``,
``reproduce``)::

    OUT/train/<class>/<task id>.png        OUT/maps/train/<class>/<task id>.png
    OUT/test/<class>/<task id>.png         OUT/maps/test/<class>/<task id>.png

Each task's class is its latest annotation's choice (a "none of these" choice, or none, skips
the task); its map is that annotation's attention brushes merged, at the image's size (255:
attend). The split is stable (a hash of the task id, as the backend's gate uses), so exporting
again puts every task on the same side. Images come through the same loader as predictions,
with the same limits; a task whose image cannot be fetched is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from backend.corrections import CorrectionError, brush_alpha, chosen_class, latest_annotation
from backend.images import ImageFetchError, ImageLoader
from backend.label_config import LabelConfigError, config_classes, targets_for
from backend.label_studio import LabelStudioAPI, LabelStudioAPIError
from backend.settings import Settings
from model.round import is_held_out

log = logging.getLogger(__name__)


class ExportError(LabelStudioAPIError):
    """The project cannot become a dataset (Label Studio's refusals are LabelStudioAPIError)."""


@dataclass
class ExportSummary:
    """What was written, and what was skipped and why."""

    classes: list[str]
    written: Counter[str] = field(default_factory=Counter)  # "<split>/<class>" -> images
    maps: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> tasks

    def lines(self) -> list[str]:
        out = [f"{key}: {n}" for key, n in sorted(self.written.items())]
        out.append(f"maps: {self.maps}")
        out += [f"skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        return out


def export_project(
    url: str,
    project: int,
    out: Path,
    token: str | None,
    settings: Settings,
    test_fraction: float = 0.2,
) -> ExportSummary:
    """Write `project`'s annotated tasks under `out`; returns what was written."""
    api = LabelStudioAPI(url, token, timeout=max(settings.image_timeout, 300.0))
    info = api.call("GET", f"/api/projects/{project}/")
    config = info.get("label_config") if isinstance(info, dict) else None
    if not isinstance(config, str):
        raise ExportError(f"project {project}: Label Studio sent no label_config")
    try:
        classes = config_classes(config, settings.other_choices)
        targets = targets_for(config, classes, settings.other_choices)
    except LabelConfigError as exc:
        raise ExportError(f"project {project}: {exc}") from exc
    tasks = api.call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON"})
    if not isinstance(tasks, list):
        raise ExportError(f"project {project}: the export is not a list of tasks")
    loader = ImageLoader(
        dataclasses.replace(
            settings, label_studio_url=api.conn.url, label_studio_api_key=token, image_cache=False
        )
    )
    summary = ExportSummary(classes=list(classes))
    for task in tqdm(tasks, desc=f"project {project}", unit="task", disable=None):
        reason = _export_task(task, targets, classes, loader, out, test_fraction, summary)
        if reason:
            summary.skipped[reason] += 1
    return summary


def _export_task(
    task: Any,
    targets: Any,
    classes: tuple[str, ...],
    loader: ImageLoader,
    out: Path,
    test_fraction: float,
    summary: ExportSummary,
) -> str | None:
    """Write one task; returns why it was skipped, or None."""
    if not isinstance(task, dict) or not isinstance(task.get("id"), int):
        return "malformed task"
    annotation = latest_annotation(task)
    if annotation is None:
        return "no annotation"
    label = chosen_class(annotation["result"], targets)
    if label not in classes:
        return "no class" if label is None else "not a class"
    data = task.get("data")
    image_url = data.get(targets.data_key) if isinstance(data, dict) else None
    if not isinstance(image_url, str):
        return "no image"
    try:
        brush = brush_alpha(annotation["result"], targets, loader.settings.brush_max_pixels)
        loaded = loader.load(image_url, task.get("project"), task["id"])
    except (CorrectionError, ImageFetchError) as exc:
        log.warning("task %s skipped: %s", task["id"], exc)
        return "bad brush" if isinstance(exc, CorrectionError) else f"image {exc.reason}"
    split = "test" if is_held_out(task["id"], test_fraction) else "train"
    folder = out / split / label
    folder.mkdir(parents=True, exist_ok=True)
    loaded.image.save(folder / f"{task['id']}.png")
    summary.written[f"{split}/{label}"] += 1
    if brush is not None:
        maps = out / "maps" / split / label
        maps.mkdir(parents=True, exist_ok=True)
        Image.fromarray(brush[0]).save(maps / f"{task['id']}.png")
        summary.maps += 1
    return None
