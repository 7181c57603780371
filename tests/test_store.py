"""backend/store.py: the loop's durable state in SQLite."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from backend.corrections import Correction
from backend.store import LoopStore


def _correction(aid: int = 7, level: int = 200, updated: str = "2026-11-26T10:00:00Z"):
    """An edited correction of task 3 whose 2x2 target is `level` / 255 everywhere."""
    return Correction(
        project="1",
        annotation_id=aid,
        task_id=3,
        image="/data/upload/1/a.png",
        label="cat",
        target=np.full((2, 2), level / 255, dtype=np.float32),
        edited=True,
        model_version="v1",
        updated_at=updated,
    )


def test_store_is_idempotent_ordered_and_durable(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    assert store.put(_correction())
    assert not store.put(_correction())  # the same event twice changes nothing
    assert store.untrained_count("1") == 1
    assert store.put(_correction(level=50, updated="2026-11-26T11:00:00Z"))  # an update
    assert not store.put(_correction(level=90, updated="2026-11-26T10:30:00Z"))  # a late, older one
    reopened = LoopStore(tmp_path / "c.sqlite3")  # a restart
    [kept] = reopened.corrections("1")
    np.testing.assert_allclose(kept.target, np.full((2, 2), 50 / 255), rtol=1e-6)
    assert reopened.delete("1", [7]) == 1
    assert reopened.corrections("1") == []
    assert not reopened.put(_correction(updated="2026-11-26T12:00:00Z"))  # no resurrection
    reopened.delete("1", [99])  # deleted before it was ever seen
    assert not reopened.put(_correction(aid=99))


def test_store_marks_trained_corrections(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    for aid in (1, 2, 3):
        store.put(_correction(aid=aid))
    store.mark_trained("1", [1, 2], "v2")
    assert store.untrained_count("1") == 1
    assert store.summary() == {
        "1": {"corrections": 3, "confirmations": 0, "untrained": 1, "labelled": 3}
    }


def test_store_compares_timestamps_only_as_strings(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    assert store.put(_correction())
    odd = dataclasses.replace(_correction(level=10), updated_at=5)  # type: ignore[arg-type]
    assert store.put(odd)  # not comparable: not taken as older; no TypeError


def test_predictions_and_training_requests_are_remembered(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    store.record_predictions("1", [3, 4], "v2")
    assert store.predicted_version("1", 4) == "v2" and store.predicted_version("1", 5) is None
    store.request_training("1", "START_TRAINING")
    store.request_training("1", "10 new corrections")  # one request per project
    assert LoopStore(tmp_path / "c.sqlite3").pending_requests() == [("1", "10 new corrections")]
    store.clear_request("1")
    assert store.pending_requests() == []


def test_a_label_alone_is_kept_for_first_models_not_rounds(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    label_only = dataclasses.replace(_correction(aid=8), target=None, edited=False)
    assert store.put(label_only)
    assert not store.put(label_only)  # idempotent without a target too
    store.put(_correction(aid=9))
    assert [c.annotation_id for c in store.corrections("1")] == [9]  # rounds need a brush
    labelled = store.labelled("1")
    assert [(c.annotation_id, c.target is None) for c in labelled] == [(8, True), (9, False)]
    assert [c.annotation_id for c in store.annotations("1")] == [8, 9]
    assert store.labelled_count("1") == 2 and store.untrained_count("1") == 1
    assert store.summary()["1"] == {
        "corrections": 1,
        "confirmations": 0,
        "untrained": 1,
        "labelled": 2,
    }
    store.delete("1", [8])
    assert store.labelled_count("1") == 1


def test_label_configs_are_kept_per_project(tmp_path: Path) -> None:
    store = LoopStore(tmp_path / "c.sqlite3")
    assert store.label_config("1") is None
    store.remember_label_config("1", "<View>a</View>")
    store.remember_label_config("2", "<View>b</View>")
    store.remember_label_config("1", "<View>c</View>")
    reopened = LoopStore(tmp_path / "c.sqlite3")
    assert (reopened.label_config("1"), reopened.label_config("2")) == (
        "<View>c</View>",
        "<View>b</View>",
    )
