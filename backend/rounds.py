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

import dataclasses
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from backend.brush import BrushDecodeError, decode_rle
from backend.corrections import (
    Correction,
    CorrectionError,
    brush_alpha,
    chosen_class,
    latest_annotation,
)
from backend.label_config import Targets, config_classes, targets_for
from backend.label_studio import LabelStudioAPI, LabelStudioAPIError
from backend.registry import ModelRegistry, RegistryError, answering
from backend.settings import Settings
from backend.store import LoopStore
from model.checkpoint import atomic_write
from model.errors import UserError
from model.round_report import ProjectRound, write_project_report
from model.selection import Candidate, CorrectedMap, select

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
    # Whether Label Studio shows `tasks` in the order the strategy gave; it sorts a tab by its
    # prediction score of the project's model version, which is the ML backend's title (not a
    # version) once a backend is connected, and then every score is empty (docs/rounds.md).
    in_strategy_order: bool = True
    # What came of it, as last refreshed (refresh_rounds): Label Studio's annotations of its
    # tasks since it was made, and the training on its version since then.
    annotated: int = 0  # its tasks submitted since the round was made
    corrected: int = 0  # of those, with the attention brush edited
    lead_time_s: float = 0.0  # the annotators' time on them (Label Studio's lead_time)
    training: str | None = None  # the training on `version` since: "published" or "rejected"
    version_after: str | None = None  # the version that training published
    before: HeldOut | None = None  # held-out scores of `version` (the gate's)
    after: HeldOut | None = None  # held-out scores of the model trained from the round
    refreshed_at: float | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundRecord:
        """A record as written to disk (older records lack the outcome fields)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        for side in ("before", "after"):
            if isinstance(values.get(side), dict):
                values[side] = HeldOut.from_dict(values[side])
        return cls(**values)


@dataclass(frozen=True)
class HeldOut:
    """A model's scores on the project's held-out labelled tasks, as the gate computed them."""

    accuracy: float | None
    map_mse: float | None
    count: int

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HeldOut:
        return cls(raw.get("accuracy"), raw.get("map_mse"), int(raw.get("count") or 0))


def project_version(settings: Settings, project: str, classes: tuple[str, ...] | None) -> str:
    """The version that predicts for `project` (of these classes; None: any): the registry's
    one rule, as serving applies it (its own lineage's, or a shared model of its classes)."""
    answer = answering(settings.model_dir, project, classes)
    if answer.version is None:
        raise RoundError(
            f"{answer.reason}: label some tasks and train its first version before a round of "
            "corrections"
        )
    return answer.version


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


def corrected_maps(corrections: list[Correction]) -> list[CorrectedMap]:
    """The maps annotators left on the project's corrected tasks, with their class."""
    return [
        CorrectedMap(c.label, c.target)
        for c in corrections
        if c.edited and c.label is not None and c.target is not None
    ]


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
        project_version(settings, key, None)  # no model at all: refused before any call
        config = project_config(api, project, settings)
        version = project_version(settings, key, config.classes)
        targets = config.targets
        store = LoopStore(settings.layout.corrections_db)
        corrections = store.corrections(key)  # read once: the exclusions and the maps
        corrected = {c.task_id for c in corrections if c.edited and c.model_version == version}
        with_maps = strategy in ("map-entropy", "map-disagreement")
        pool, left_out = candidates(api.tasks(project), targets, version, corrected, with_maps)
        if not pool:
            raise RoundError(
                f"project {project}: no task to offer for {version} "
                f"({', '.join(f'{n} {r}' for r, n in left_out.items()) or 'no tasks'}); "
                "retrieve predictions first"
            )
        chosen = select(pool, strategy, size, seed, corrected=corrected_maps(corrections))
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
        tasks = in_tab + [t for t in wanted if t not in in_tab]
        in_order = tasks == [c.task_id for c in chosen]
        if not in_order:
            why = (
                "it sorts a tab by prediction score, least confident first"
                if config.model_version == version
                else f"it sorts by its prediction score of the project's model version "
                f"{config.model_version!r}, which is not {version}, so every score it sorts by is "
                f"empty (set the project's model version to {version} to sort by its scores)"
            )
            log.warning(
                "project %s: Label Studio shows the tab of round %d in another order than %s "
                "gave: %s; docs/rounds.md",
                project,
                number,
                strategy,
                why,
            )
        record = RoundRecord(
            project=project,
            number=number,
            strategy=strategy,
            size=size,
            version=version,
            tasks=tasks,
            view_id=view["id"],
            title=title,
            url=f"{api.conn.url}/projects/{project}/data?tab={view['id']}",
            created_at=time.time(),
            left_out=left_out,
            in_strategy_order=in_order,
        )
        try:
            write_record(settings, record)
        except OSError:
            delete_tab(api, project, view["id"])
            raise
        return record


@dataclass(frozen=True)
class ProjectConfig:
    """A project's label config as Label Studio has it now: its classes and control names,
    and the model version whose prediction scores its Data Manager sorts by."""

    classes: tuple[str, ...]
    targets: Targets
    model_version: str | None = None


def project_config(api: LabelStudioAPI, project: int, settings: Settings) -> ProjectConfig:
    """The project's classes and control names, read from Label Studio."""
    info = api.call("GET", f"/api/projects/{project}/")
    config = info.get("label_config") if isinstance(info, dict) else None
    if not isinstance(config, str):
        raise RoundError(f"project {project}: Label Studio sent no label_config")
    classes = config_classes(config, settings.other_choices)
    version = info.get("model_version")
    return ProjectConfig(
        classes,
        targets_for(config, classes, settings.other_choices),
        version if isinstance(version, str) else None,
    )


def project_targets(api: LabelStudioAPI, project: int, settings: Settings) -> Targets:
    """The control names of the project's label config, as Label Studio has it now."""
    return project_config(api, project, settings).targets


def write_record(settings: Settings, record: RoundRecord) -> Path:
    path = settings.layout.rounds(str(record.project)) / f"round-{record.number}.json"
    with atomic_write(path, "w") as f:
        json.dump(asdict(record), f, indent=1)
    return path


def read_rounds(settings: Settings, project: str) -> list[RoundRecord]:
    """The project's round records, first round first (an unreadable one is skipped, logged)."""
    records = []
    for path in settings.layout.rounds(project).glob("round-*.json"):
        try:
            records.append(RoundRecord.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            log.error("%s: unreadable round record (%s)", path, exc)
    return sorted(records, key=lambda r: r.number)


def training_of(settings: Settings, record: RoundRecord) -> tuple[str | None, str | None, Any]:
    """(status, version after, gate record) of the training on the round's version since the
    round was made: a version of the project's lineage whose parent is the round's version, else
    the project's last job if it refused one; (None, None, None) before any."""
    key = str(record.project)
    lineage = ModelRegistry(settings.model_dir, key)
    if lineage.layout.registry_index.is_file():
        for entry in lineage.versions():
            if (
                entry.get("parent_version") == record.version
                and float(entry.get("published_at") or 0) >= record.created_at
            ):
                return "published", entry["version"], entry.get("gate")
    try:
        last = json.loads(settings.layout.job_result(key).read_text())
    except (OSError, ValueError):
        return None, None, None
    if (
        isinstance(last, dict)
        and last.get("status") == "rejected"
        and last.get("parent_version") == record.version
        and float(last.get("started_at") or 0) >= record.created_at
    ):
        return "rejected", None, last.get("gate")
    return None, None, None


def version_scores(settings: Settings, version: str) -> HeldOut | None:
    """The held-out scores a version was published with (its gate's "after"), if any."""
    try:
        registry = ModelRegistry.of_version(settings.model_dir, version)
        entries = registry.versions() if registry.layout.registry_index.is_file() else []
    except RegistryError:
        return None
    for entry in entries:
        gate = entry.get("gate")
        if entry.get("version") == version and isinstance(gate, dict):
            return held_out(gate.get("after"))
    return None


def held_out(raw: Any) -> HeldOut | None:
    return HeldOut.from_dict(raw) if isinstance(raw, dict) else None


def submitted_at(annotation: dict[str, Any]) -> float | None:
    """When Label Studio last saved an annotation (Unix time), or None if it does not say."""
    stamp = annotation.get("updated_at") or annotation.get("created_at")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def annotations_since(
    tasks: dict[int, dict[str, Any]], record: RoundRecord, targets: Targets
) -> tuple[int, int, float]:
    """Of the round's tasks: how many were submitted since it was made, how many of those with
    an edited brush, and the annotators' time on those annotations (their ``lead_time``)."""
    annotated = corrected = 0
    seconds = 0.0
    for task_id in record.tasks:
        task = tasks.get(task_id) or {}
        mine = [
            a
            for a in task.get("annotations") or []
            if isinstance(a, dict)
            and not a.get("was_cancelled")
            and (submitted_at(a) or 0.0) >= record.created_at
        ]
        if not mine:
            continue
        annotated += 1
        seconds += sum(float(a.get("lead_time") or 0.0) for a in mine)
        latest = latest_annotation({"annotations": mine})
        try:
            brush = brush_alpha(latest["result"], targets) if latest else None
        except CorrectionError:
            brush = None
        corrected += bool(brush and brush[1])
    return annotated, corrected, round(seconds, 3)


def refresh_rounds(api: LabelStudioAPI, project: int, settings: Settings) -> list[RoundRecord]:
    """Every round of the project with its outcome read again (Label Studio's annotations,
    the training since), each record rewritten; a project with no round gets []."""
    records = read_rounds(settings, str(project))
    if not records:
        return []
    targets = project_targets(api, project, settings)
    tasks = {t["id"]: t for t in api.tasks(project) if isinstance(t.get("id"), int)}
    out = []
    for record in records:
        annotated, corrected, seconds = annotations_since(tasks, record, targets)
        status, after_version, gate = training_of(settings, record)
        gate = gate if isinstance(gate, dict) else {}
        updated = dataclasses.replace(
            record,
            annotated=annotated,
            corrected=corrected,
            lead_time_s=seconds,
            training=status,
            version_after=after_version,
            before=held_out(gate.get("before")) or version_scores(settings, record.version),
            after=held_out(gate.get("after")),
            refreshed_at=time.time(),
        )
        write_record(settings, updated)
        out.append(updated)
    return out


def delete_tab(api: LabelStudioAPI, project: int, view_id: int) -> None:
    """Take back a tab whose round could not be recorded."""
    try:
        api.call("DELETE", f"/api/dm/views/{view_id}/")
    except LabelStudioAPIError:
        log.error("the tab %s of project %s could not be deleted", view_id, project)


def report_rounds(records: list[RoundRecord]) -> list[ProjectRound]:
    """The records in the report's plain terms (model/round_report.py)."""
    return [
        ProjectRound(
            number=r.number,
            strategy=r.strategy,
            tasks=len(r.tasks),
            annotated=r.annotated,
            corrected=r.corrected,
            lead_time_s=r.lead_time_s,
            version=r.version,
            version_after=r.version_after,
            training=r.training,
            before_accuracy=r.before.accuracy if r.before else None,
            before_map_mse=r.before.map_mse if r.before else None,
            after_accuracy=r.after.accuracy if r.after else None,
            after_map_mse=r.after.map_mse if r.after else None,
        )
        for r in records
    ]


def write_round_report(records: list[RoundRecord], out: Path, project: int) -> Path:
    if not records:
        raise RoundError(f"project {project} has no rounds yet: make one with abn round first")
    return write_project_report(report_rounds(records), out, str(project))
