"""backend/verdict.py: what a round's tab says, and that failing to say it loses nothing.

Making and updating the tab in a real Label Studio is tests/e2e/test_gate_e2e.py's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import FakeLabelStudio
from processes import free_port

from backend.settings import Settings
from backend.verdict import TAB_TASKS, TITLE_LIMIT, post_verdict, verdict_of

GATE = {
    "before": {"accuracy": 0.2, "count": 10},
    "after": {"accuracy": 0.6, "count": 10},
    "paired": {"fixed": 4, "broken": 0},
}


def test_the_verdict_says_the_outcome_and_its_numbers() -> None:
    published = verdict_of(
        {"status": "published", "version": "p3-v2", "gate": GATE, "new_task_ids": [7, 8]}
    )
    assert published is not None and published.task_ids == (7, 8)
    assert published.title == (
        "ABN: round published as p3-v2: held-out accuracy 0.20 -> 0.60 "
        "(4 fixed, 0 broken, 10 tasks)"
    )
    refused = verdict_of(
        {
            "status": "rejected",
            "parent_version": "p3-v2",
            "reasons": ["held-out accuracy fell from 0.538 to 0.231 (margin 0.05)"],
            "gate": GATE,
        }
    )
    assert refused is not None and refused.task_ids == ()
    assert refused.title == (
        "ABN: round refused, p3-v2 still serves: held-out accuracy fell from 0.538 to 0.231 "
        "(margin 0.05)"
    )
    first = verdict_of(
        {"status": "published", "version": "p3-v1", "first_model": {"validation_accuracy": 0.5}}
    )
    assert first is not None and first.title == ("ABN: first model p3-v1, validation accuracy 0.50")
    failed = verdict_of(
        {"status": "failed", "reasons": ["OSError: /srv/x?token=secret: no space left"]}
    )
    # Every Label Studio user sees the tab: the exception's kind only, never its text.
    assert failed is not None
    assert failed.title == "ABN: training failed (OSError); the reason is in /status"
    assert verdict_of({"status": "skipped", "reasons": ["nothing new"]}) is None
    long = verdict_of({"status": "rejected", "parent_version": "v1", "reasons": ["x" * 1000]})
    assert long is not None and len(long.title) == TITLE_LIMIT and long.title.endswith("...")
    many = verdict_of({"status": "rejected", "parent_version": "v1", "reasons": ["no gain"],
                       "new_task_ids": list(range(5000))})  # fmt: skip
    assert many is not None and many.task_ids == tuple(range(TAB_TASKS))
    assert many.title.endswith(f"[the tab holds the first {TAB_TASKS} of its 5000 new tasks]")


def test_the_verdict_puts_first_the_accuracy_the_gate_judged() -> None:
    views = {
        "before": {"accuracy": 0.3, "count": 8},
        "after": {"accuracy": 0.7, "count": 8},
        "paired": {"fixed": 4, "broken": 1},
    }
    record = {"status": "published", "version": "p3-v3", "new_task_ids": [1]}
    judged_on_views = verdict_of(
        {**record, "gate": {**GATE, "judged_on": "counterfactual", "counterfactual": views}}
    )
    assert judged_on_views is not None
    assert judged_on_views.title == (
        "ABN: round published as p3-v3: on counterfactual views 0.30 -> 0.70 "
        "(4 fixed, 1 broken, 8 tasks); held-out accuracy 0.20 -> 0.60 "
        "(4 fixed, 0 broken, 10 tasks)"
    )
    on_tasks = verdict_of({**record, "gate": {**GATE, "counterfactual": views}})
    assert on_tasks is not None and on_tasks.title.startswith(
        "ABN: round published as p3-v3: held-out accuracy 0.20 -> 0.60"
    )
    assert on_tasks.title.endswith(
        "on counterfactual views 0.30 -> 0.70 (4 fixed, 1 broken, 8 tasks)"
    )


def test_a_label_studio_that_cannot_be_reached_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = {"status": "published", "version": "p3-v2", "gate": GATE, "new_task_ids": [1]}
    closed = Settings(
        model_dir=tmp_path, label_studio_url=f"http://127.0.0.1:{free_port()}", verdict_tab=True
    )
    with caplog.at_level(logging.WARNING, logger="backend.verdict"):
        assert post_verdict(closed, "3", record) is None
    assert "could not show the verdict" in caplog.text and "cannot reach" in caplog.text
    assert not (tmp_path / "verdicts").exists()  # no tab id recorded for a tab never made

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="backend.verdict"):
        # Turned off, not tried at all; a project that is not Label Studio's, not either.
        assert post_verdict(closed.replace(verdict_tab=False), "3", record) is None
        assert post_verdict(closed, "../3", record) is None
        # No host set and none known from the project's /setup: nowhere to show it.
        assert post_verdict(Settings(model_dir=tmp_path), "3", record) is None
    assert "could not show" not in caplog.text
    assert "no Label Studio host known" in caplog.text


def test_only_the_projects_own_verdict_tab_on_the_same_host_is_rewritten(
    tmp_path: Path, fake_ls: FakeLabelStudio
) -> None:
    fake_ls.accept_views = True
    settings = Settings(
        model_dir=tmp_path, label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.token
    )
    record = {"status": "published", "version": "p3-v2", "gate": GATE, "new_task_ids": [1]}
    assert post_verdict(settings, "3", record) == 1  # made
    saved = json.loads((tmp_path / "verdicts" / "3.json").read_text())
    assert saved == {"view_id": 1, "url": fake_ls.url}

    def shown(title: str, project: int = 3) -> None:
        view = {"id": 1, "project": project, "data": {"title": title}}
        fake_ls.add("/api/dm/views/1/", json.dumps(view).encode())

    shown("ABN: round published as p3-v2")  # still ours: rewritten in place
    assert post_verdict(settings, "3", {**record, "version": "p3-v3"}) == 1
    [(patched, body)] = fake_ls.patches
    assert patched == 1 and body["data"]["title"].startswith("ABN: round published as p3-v3")

    shown("Review of last week")  # a manager made it theirs: left alone, a new tab made
    assert post_verdict(settings, "3", record) == 2
    shown("ABN: round published as p3-v2", project=4)  # the id is another project's now
    assert post_verdict(settings, "3", record) == 3
    assert len(fake_ls.patches) == 1 and len(fake_ls.views) == 3

    # The backend moved to another Label Studio: the recorded id means nothing there, and is
    # not even read back.
    saved = json.loads((tmp_path / "verdicts" / "3.json").read_text())
    (tmp_path / "verdicts" / "3.json").write_text(json.dumps({**saved, "url": "http://old:8080"}))
    before = len(fake_ls.requests)
    assert post_verdict(settings, "3", record) == 4
    assert [(m, p) for m, p, _ in fake_ls.requests[before:]] == [("POST", "/api/dm/views/")]
    # A tab deleted in Label Studio (404 on reading it back): a new one.
    assert post_verdict(settings, "3", record) == 5
