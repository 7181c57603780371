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

import requests
from PIL import Image
from tqdm import tqdm

from backend.corrections import CorrectionError, brush_alpha, chosen_class
from backend.images import ImageFetchError, ImageLoader
from backend.label_config import LabelConfigError, config_classes, targets_for
from backend.label_studio import LabelStudioConnection
from backend.settings import Settings
from model.errors import UserError
from model.round import is_held_out

log = logging.getLogger(__name__)


class ExportError(UserError, RuntimeError):
    """Label Studio refused, or the project cannot become a dataset."""


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


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's most recently updated annotation that was not cancelled (skipped)."""
    annotations = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled") and isinstance(a.get("result"), list)
    ]
    if not annotations:
        return None
    return max(annotations, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0))


def export_project(
    url: str,
    project: int,
    out: Path,
    token: str | None,
    settings: Settings,
    test_fraction: float = 0.2,
) -> ExportSummary:
    """Write `project`'s annotated tasks under `out`; returns what was written."""
    conn = LabelStudioConnection(url.rstrip("/"), token)
    session = requests.Session()
    session.headers.update(conn.auth_header())
    info = _get(session, f"{conn.url}/api/projects/{project}/", settings.image_timeout)
    config = info.get("label_config") if isinstance(info, dict) else None
    if not isinstance(config, str):
        raise ExportError(f"project {project}: Label Studio sent no label_config")
    try:
        classes = config_classes(config, settings.other_choices)
        targets = targets_for(config, classes, settings.other_choices)
    except LabelConfigError as exc:
        raise ExportError(f"project {project}: {exc}") from exc
    tasks = _get(
        session,
        f"{conn.url}/api/projects/{project}/export?exportType=JSON",
        max(settings.image_timeout, 300.0),
    )
    if not isinstance(tasks, list):
        raise ExportError(f"project {project}: the export is not a list of tasks")
    loader = ImageLoader(
        dataclasses.replace(
            settings, label_studio_url=conn.url, label_studio_api_key=token, image_cache=False
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


def _get(session: requests.Session, url: str, timeout: float) -> Any:
    try:
        reply = session.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise ExportError(f"cannot reach Label Studio at {url}: {exc}") from exc
    if reply.status_code in (401, 403):
        raise ExportError(
            f"Label Studio refused {url} (HTTP {reply.status_code}): pass --token or set "
            "LABEL_STUDIO_API_KEY to a token of a member of the project"
        )
    if not reply.ok:
        raise ExportError(f"Label Studio answered {url} with HTTP {reply.status_code}")
    try:
        return reply.json()
    except ValueError as exc:
        raise ExportError(f"{url} did not answer JSON") from exc
