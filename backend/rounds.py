"""``abn round``: an active-learning round, as a Label Studio tab holding the tasks to correct.

The project manager asks for N tasks by a strategy (``model/selection.py``). The backend reads
the project's tasks from Label Studio with their predictions by the project's current version,
leaves out the tasks already corrected for that version, ranks the rest, and creates a Data
Manager tab ("Round k: ...") filtered to exactly those tasks, least confident first; annotators
open it and label in that order. The round is recorded under ``MODEL_DIR/rounds/<project>/``.

Nothing half-made is left: the record is written only once the tab exists, and a tab whose
record cannot be written is deleted again. Two rounds of one project are not made at once (a
file lock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend.brush import BrushDecodeError, decode_rle
from backend.corrections import chosen_class, latest_annotation
from backend.label_config import Targets, config_classes, targets_for
from backend.label_studio import LabelStudioAPI, LabelStudioAPIError
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import LoopStore
from model.checkpoint import atomic_write
from model.errors import UserError
from model.selection import Candidate, select

log = logging.getLogger(__name__)


class RoundError(UserError, RuntimeError):
    """A round that cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class RoundRecord:
    """One round: which tasks, chosen how, for which version, and the tab that holds them."""

    project: int
    number: int
    strategy: str
    size: int
    version: str
    tasks: list[int]  # in the order to label them
    view_id: int
    title: str
    url: str  # the tab in Label Studio
    created_at: float
    left_out: dict[str, int]  # candidates not offered, by reason


def project_version(settings: Settings, project: str) -> str:
    """The version that predicts for `project`: its own lineage's, or the shared model's."""
    for registry in (ModelRegistry(settings.model_dir, project), ModelRegistry(settings.model_dir)):
        if registry.layout.registry_index.is_file():
            current = registry.current()
            if current is not None:
                return current["version"]
    raise RoundError(
        f"project {project} has no model yet: label some tasks and train its first version "
        "before a round of corrections"
    )


def candidates(
    tasks: list[dict[str, Any]],
    targets: Targets,
    version: str,
    corrected: set[int],
    with_maps: bool,
) -> tuple[list[Candidate], dict[str, int]]:
    """The tasks a round may offer, and how many were left out for each reason."""
    out, left_out = [], {"corrected for this version": 0, "no prediction by this version": 0}
    for task in tasks:
        task_id = task.get("id")
        if not isinstance(task_id, int):
            continue
        if task_id in corrected:
            left_out["corrected for this version"] += 1
            continue
        predictions = [
            p
            for p in task.get("predictions") or []
            if isinstance(p, dict) and p.get("model_version") == version and p.get("result")
        ]
        if not predictions:
            left_out["no prediction by this version"] += 1
            continue
        prediction = predictions[-1]
        results = prediction.get("result") or []
        annotation = latest_annotation(task)
        labelled = chosen_class(annotation["result"], targets) if annotation else None
        out.append(
            Candidate(
                task_id=task_id,
                score=float(prediction.get("score") or 0.0),
                predicted=chosen_class(results, targets),
                labelled=labelled,
                attention=brush_map(results, targets) if with_maps else None,
            )
        )
    return out, {reason: n for reason, n in left_out.items() if n}


def brush_map(results: list[Any], targets: Targets) -> Any:
    """The predicted attention brush as an alpha array, or None."""
    for r in results:
        if (
            isinstance(r, dict)
            and r.get("type") == "brushlabels"
            and r.get("from_name") == targets.brush
        ):
            value = r.get("value") or {}
            try:
                return decode_rle(value.get("rle"), r["original_height"], r["original_width"])
            except (BrushDecodeError, KeyError, TypeError):
                return None
    return None


def tab_filters(task_ids: list[int]) -> dict[str, Any]:
    """A Data Manager filter that holds exactly these tasks."""
    return {
        "conjunction": "or",
        "items": [
            {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": t}
            for t in task_ids
        ],
    }


@contextmanager
def one_round_at_a_time(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "round.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RoundError("another round of this project is being made; try again") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_round(
    api: LabelStudioAPI,
    project: int,
    strategy: str,
    size: int,
    settings: Settings,
    seed: int = 0,
) -> RoundRecord:
    """Choose the round's tasks and create its tab; returns the record written."""
    key = str(project)
    folder = settings.layout.rounds(key)
    with one_round_at_a_time(folder):
        version = project_version(settings, key)
        info = api.call("GET", f"/api/projects/{project}/")
        config = info.get("label_config") if isinstance(info, dict) else None
        if not isinstance(config, str):
            raise RoundError(f"project {project}: Label Studio sent no label_config")
        targets = targets_for(
            config, config_classes(config, settings.other_choices), settings.other_choices
        )
        store = LoopStore(settings.layout.corrections_db)
        corrected = {
            c.task_id for c in store.corrections(key) if c.edited and c.model_version == version
        }
        pool, left_out = candidates(
            api.tasks(project), targets, version, corrected, with_maps=strategy == "map-entropy"
        )
        if not pool:
            raise RoundError(
                f"project {project}: no task to offer for {version} "
                f"({', '.join(f'{n} {r}' for r, n in left_out.items()) or 'no tasks'}); "
                "retrieve predictions first"
            )
        chosen = select(pool, strategy, size, seed)
        if len(chosen) < size:
            log.warning(
                "project %s: only %d task(s) left for a round of %d", project, len(chosen), size
            )
        number = 1 + len(list(folder.glob("round-*.json")))
        title = f"Round {number}: {strategy}, {len(chosen)} tasks ({version})"
        ordered = sorted(chosen, key=lambda c: (c.score, c.task_id))  # as the tab orders them
        view = api.call(
            "POST",
            "/api/dm/views/",
            json={
                "project": project,
                "data": {
                    "title": title,
                    "filters": tab_filters([c.task_id for c in ordered]),
                    "ordering": ["tasks:predictions_score"],
                },
            },
        )
        if not isinstance(view, dict) or not isinstance(view.get("id"), int):
            raise RoundError(f"project {project}: Label Studio made no tab ({str(view)[:200]})")
        try:  # the order Label Studio's tab shows them in (its prediction score may average
            # in earlier versions' predictions), which is the order annotators will get
            shown = api.call(
                "GET",
                "/api/tasks/",
                params={"project": project, "view": view["id"], "page_size": 1000},
            )
        except LabelStudioAPIError:
            delete_tab(api, project, view["id"])
            raise
        listed = [t.get("id") for t in (shown or {}).get("tasks", []) if isinstance(t, dict)]
        wanted = [c.task_id for c in ordered]
        in_tab = [t for t in listed if t in wanted]
        record = RoundRecord(
            project=project,
            number=number,
            strategy=strategy,
            size=size,
            version=version,
            tasks=in_tab + [t for t in wanted if t not in in_tab],
            view_id=view["id"],
            title=title,
            url=f"{api.conn.url}/projects/{project}/data?tab={view['id']}",
            created_at=time.time(),
            left_out=left_out,
        )
        try:
            with atomic_write(folder / f"round-{number}.json", "w") as f:
                json.dump(asdict(record), f, indent=1)
        except OSError:
            delete_tab(api, project, view["id"])
            raise
        return record


def delete_tab(api: LabelStudioAPI, project: int, view_id: int) -> None:
    """Take back a tab whose round could not be recorded."""
    try:
        api.call("DELETE", f"/api/dm/views/{view_id}/")
    except LabelStudioAPIError:
        log.error("the tab %s of project %s could not be deleted", view_id, project)
