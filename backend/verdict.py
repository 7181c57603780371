"""A round's verdict, shown where a project's people look: a Data Manager tab of its own.

Label Studio 1.23.2 shows nothing a backend sends after Start Training (its train call answers
an empty 200), and the ML backend's card shows only fields the project manager set. The Data
Manager is what annotators and managers open first, and its tabs are the one thing a backend may
own there without rewriting anyone's settings. So each project gets one tab, made and then kept
up to date by the worker after every round: its title is the verdict with its numbers, and it
holds the tasks whose annotations were new to that round, so they can be reviewed in one click.
The tab's id is kept in ``MODEL_DIR/verdicts/<project>.json`` with the Label Studio host it
belongs to. Before a tab is updated it is read back: only a tab of that project whose title
still starts with ``ABN:`` is rewritten, so a tab id of another host (the backend moved), a tab
someone deleted, or one a manager renamed as their own is left alone and a new verdict tab is
made.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.label_studio import LabelStudioAPI, LabelStudioAPIError, ProjectConnections
from backend.rounds import tab_filters
from backend.settings import Settings
from model.checkpoint import atomic_write

log = logging.getLogger(__name__)

TITLE_LIMIT = 300  # characters: a tab title, not a report; the full reasons are in /status
TAB_TASKS = 200  # the most tasks a verdict tab lists (one filter item each)
TITLE_PREFIX = "ABN:"  # every verdict's title starts with it: how a tab is known to be ours


@dataclass(frozen=True)
class Verdict:
    """What one round's job record says, as a tab shows it."""

    title: str
    task_ids: tuple[int, ...]  # the tasks whose annotations were new to the round


def _accuracy_change(scores: dict[str, Any], name: str) -> str:
    """`name`'s accuracy before and after, with the paired changes ("" without both)."""
    before = (scores.get("before") or {}).get("accuracy")
    after = (scores.get("after") or {}).get("accuracy")
    paired = scores.get("paired") or {}
    count = (scores.get("before") or {}).get("count")
    if before is None or after is None:
        return ""
    return (
        f"{name} {before:.2f} -> {after:.2f} "
        f"({paired.get('fixed', 0)} fixed, {paired.get('broken', 0)} broken, {count} tasks)"
    )


def _accuracy(gate: dict[str, Any]) -> str:
    """The accuracy the gate judged first, then the other one where the record has it."""
    tasks = _accuracy_change(gate, "held-out accuracy")
    views = _accuracy_change(gate.get("counterfactual") or {}, "on counterfactual views")
    parts = [views, tasks] if gate.get("judged_on") == "counterfactual" else [tasks, views]
    return "; ".join(part for part in parts if part)


def verdict_of(record: dict[str, Any]) -> Verdict | None:
    """The verdict of a round's job record; None for a record that is not a round's."""
    status = record.get("status")
    tasks = tuple(int(t) for t in record.get("new_task_ids") or ())
    if status == "published" and record.get("gate"):
        numbers = _accuracy(record["gate"])
        title = f"{TITLE_PREFIX} round published as {record.get('version')}" + (
            f": {numbers}" if numbers else ""
        )
    elif status == "published":  # a first model: no gate, its own validation
        first = record.get("first_model") or {}
        accuracy = first.get("validation_accuracy")
        title = f"{TITLE_PREFIX} first model {record.get('version')}" + (
            f", validation accuracy {accuracy:.2f}" if accuracy is not None else ""
        )
    elif status == "rejected":
        reasons = "; ".join(record.get("reasons") or ())
        title = (
            f"{TITLE_PREFIX} round refused, {record.get('parent_version')} still serves: {reasons}"
        )
    elif status == "failed":  # the exception's kind only: its text may hold paths or URLs
        kinds = [reason.split(":", 1)[0] for reason in record.get("reasons") or ()]
        title = f"{TITLE_PREFIX} training failed ({', '.join(kinds)}); the reason is in /status"
    else:
        return None
    if len(tasks) > TAB_TASKS:  # one filter item a task: keep Label Studio's query small
        title += f" [the tab holds the first {TAB_TASKS} of its {len(tasks)} new tasks]"
        tasks = tasks[:TAB_TASKS]
    if len(title) > TITLE_LIMIT:
        title = title[: TITLE_LIMIT - 3] + "..."
    return Verdict(title=title, task_ids=tasks)


def _tab_file(settings: Settings, project: str) -> Path:
    return settings.model_dir / "verdicts" / f"{project}.json"


def _tab_data(verdict: Verdict) -> dict[str, Any]:
    data: dict[str, Any] = {"title": verdict.title}
    if verdict.task_ids:
        data["filters"] = tab_filters(list(verdict.task_ids))
    return data


def recorded_tab(settings: Settings, project: str, url: str) -> int | None:
    """The id of the verdict tab made for `project` on the host at `url`, if one was."""
    try:
        saved = json.loads(_tab_file(settings, project).read_text())
        view_id, host = int(saved["view_id"]), saved.get("url")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return view_id if host == url else None


def still_ours(api: LabelStudioAPI, project: str, view_id: int) -> bool:
    """Whether tab `view_id` is still this project's verdict tab (not deleted, not renamed)."""
    try:
        view = api.call("GET", f"/api/dm/views/{view_id}/")
    except LabelStudioAPIError as exc:
        if exc.status != 404:
            raise
        log.info("project %s: the verdict tab %s is gone; making a new one", project, view_id)
        return False
    view = view if isinstance(view, dict) else {}
    title = (view.get("data") or {}).get("title") if isinstance(view.get("data"), dict) else None
    if view.get("project") != int(project) or not str(title or "").startswith(TITLE_PREFIX):
        log.info(
            "project %s: tab %s is no longer the verdict tab (%r); leaving it, making a new one",
            project,
            view_id,
            str(title)[:80],
        )
        return False
    return True


def show_verdict(api: LabelStudioAPI, settings: Settings, project: str, verdict: Verdict) -> int:
    """Make or update the project's verdict tab; its id. Raises LabelStudioAPIError."""
    view_id = recorded_tab(settings, project, api.conn.url)
    body = {"project": int(project), "data": _tab_data(verdict)}
    if view_id is not None and still_ours(api, project, view_id):
        api.call("PATCH", f"/api/dm/views/{view_id}/", json=body)
        return view_id
    view = api.call("POST", "/api/dm/views/", json=body)
    if not isinstance(view, dict) or not isinstance(view.get("id"), int):
        raise LabelStudioAPIError(f"Label Studio made no tab ({str(view)[:200]})")
    path = _tab_file(settings, project)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump({"view_id": view["id"], "url": api.conn.url}, f)
    return view["id"]


def post_verdict(settings: Settings, project: str, record: dict[str, Any]) -> int | None:
    """Best effort from the worker: a round's outcome is recorded whether or not Label Studio
    can be told. The tab's id, or None when there is nothing to show or no way to show it."""
    verdict = verdict_of(record)
    if verdict is None or not settings.verdict_tab or not project.isdigit():
        return None
    if settings.label_studio_url:
        url, token = settings.label_studio_url, settings.label_studio_api_key
    else:
        known = ProjectConnections(settings.projects_dir, None, settings.image_allowed_hosts).get(
            project
        )
        if known is None:
            log.info(
                "project %s: no Label Studio host known; the verdict stays in /status", project
            )
            return None
        url, token = known.url, known.token or settings.label_studio_api_key
    try:
        return show_verdict(LabelStudioAPI(url, token, timeout=30), settings, project, verdict)
    except LabelStudioAPIError as exc:
        log.warning("project %s: could not show the verdict in Label Studio: %s", project, exc)
        return None
