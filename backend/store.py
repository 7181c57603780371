"""The loop's durable state: SQLite in MODEL_DIR (``corrections.sqlite3``).

Five tables: the corrections (one row per annotation, its map-sized target as a blob or none
for a class label alone, kept as a tombstone once deleted), which version pre-annotated each
task (webhooks do not carry it), the training requests that wait for Redis, and each project's
label config as last seen (its classes are what a first model learns), and the top-3 the
model gave with each edited map (``edited_top3``, computed by the worker). Durable across
restarts (WAL, synchronous writes), transactional, and independent of Redis, so corrections
keep arriving while Redis is down.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from backend.corrections import Correction

SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    project TEXT NOT NULL,
    annotation_id INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    image TEXT NOT NULL,
    label TEXT,
    target BLOB,
    map_size INTEGER,
    edited INTEGER NOT NULL,
    model_version TEXT,
    updated_at TEXT,
    stored_at REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    trained_in TEXT,
    PRIMARY KEY (project, annotation_id)
);
CREATE TABLE IF NOT EXISTS predictions (
    project TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    predicted_at REAL NOT NULL,
    PRIMARY KEY (project, task_id)
);
CREATE TABLE IF NOT EXISTS training_requests (
    project TEXT PRIMARY KEY,
    requested_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS label_configs (
    project TEXT PRIMARY KEY,
    label_config TEXT NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS edited_top3 (
    project TEXT NOT NULL,
    annotation_id INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    model_version TEXT NOT NULL,
    top3 TEXT NOT NULL,
    computed_at REAL NOT NULL,
    PRIMARY KEY (project, annotation_id)
);
"""


class LoopStore:
    """Corrections per project, keyed by annotation id: storing an event twice changes nothing.

    Also which version predicted each task, and training requests waiting for Redis.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections must not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: concurrent writers (gunicorn workers) queue on the lock."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def put(self, c: Correction) -> bool:
        """Store or replace the annotation's target; False when nothing changed.

        An older update arriving after a newer one (webhooks race) is ignored, and so is any
        event for an annotation that was deleted: Label Studio never reuses annotation ids.
        """
        target = None if c.target is None else np.ascontiguousarray(c.target, dtype=np.float32)
        blob = None if target is None else target.tobytes()
        with self._connect() as db:
            row = db.execute(
                "SELECT updated_at, deleted, target, label, edited FROM corrections "
                "WHERE project = ? AND annotation_id = ?",
                (c.project, c.annotation_id),
            ).fetchone()
            if row is not None:
                updated_at, deleted, old_target, old_label, old_edited = row
                newer_stored = (
                    isinstance(updated_at, str)
                    and isinstance(c.updated_at, str)
                    and c.updated_at < updated_at
                )
                if deleted or newer_stored:
                    return False
                if (old_target, old_label, bool(old_edited)) == (blob, c.label, c.edited):
                    return False
            db.execute(
                "INSERT OR REPLACE INTO corrections (project, annotation_id, task_id, image, "
                "label, target, map_size, edited, model_version, updated_at, stored_at, deleted, "
                "trained_in) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL)",
                (
                    c.project,
                    c.annotation_id,
                    c.task_id,
                    c.image,
                    c.label,
                    blob,
                    None if target is None else target.shape[0],
                    int(c.edited),
                    c.model_version,
                    c.updated_at,
                    time.time(),
                ),
            )
            return True

    def record_predictions(self, project: str, task_ids: list[int], version: str) -> None:
        """Which version pre-annotated each task: webhooks do not carry the task's predictions,
        and a correction's lineage needs to know what the annotator was shown."""
        now = time.time()
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?)",
                [(project, t, version, now) for t in task_ids],
            )

    def predicted_version(self, project: str, task_id: int) -> str | None:
        row = (
            self._db()
            .execute(
                "SELECT model_version FROM predictions WHERE project = ? AND task_id = ?",
                (project, task_id),
            )
            .fetchone()
        )
        return row[0] if row else None

    def delete(self, project: str, annotation_ids: list[int]) -> int:
        """Remove the targets of deleted annotations (kept as tombstones); returns how many."""
        removed = 0
        with self._connect() as db:
            for annotation_id in annotation_ids:
                cur = db.execute(
                    "UPDATE corrections SET deleted = 1, target = NULL WHERE project = ? "
                    "AND annotation_id = ? AND deleted = 0",
                    (project, annotation_id),
                )
                removed += cur.rowcount
                if cur.rowcount == 0:
                    db.execute(
                        "INSERT OR IGNORE INTO corrections (project, annotation_id, task_id, "
                        "image, edited, stored_at, deleted) VALUES (?, ?, -1, '', 0, ?, 1)",
                        (project, annotation_id, time.time()),
                    )
        return removed

    def corrections(self, project: str) -> list[Correction]:
        """The live corrections and confirmations of a project (annotations with a brush),
        oldest first."""
        return self._annotations(project, "AND target IS NOT NULL")

    def labelled(self, project: str) -> list[Correction]:
        """Every live annotation of a project that names a class, with a brush or not."""
        return self._annotations(project, "AND label IS NOT NULL")

    def annotations(self, project: str) -> list[Correction]:
        """Every live annotation of a project with a class or a brush, oldest first."""
        return self._annotations(project, "AND (label IS NOT NULL OR target IS NOT NULL)")

    def _annotations(self, project: str, condition: str) -> list[Correction]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT annotation_id, task_id, image, label, target, map_size, edited, "
                "model_version, updated_at, trained_in FROM corrections WHERE project = ? "
                "AND deleted = 0 "
                f"{condition} ORDER BY stored_at",
                (project,),
            ).fetchall()
        return [
            Correction(
                project=project,
                annotation_id=aid,
                task_id=tid,
                image=image,
                label=label,
                target=None
                if blob is None
                else np.frombuffer(blob, dtype=np.float32).reshape(size, -1).copy(),
                edited=bool(edited),
                model_version=version,
                updated_at=updated,
                trained_in=trained_in,
            )
            for aid, tid, image, label, blob, size, edited, version, updated, trained_in in rows
        ]

    def untrained_count(self, project: str) -> int:
        """Edited corrections that no published version has learned from yet."""
        with self._connect() as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM corrections WHERE project = ? AND deleted = 0 "
                "AND edited = 1 AND trained_in IS NULL",
                (project,),
            ).fetchone()
        return count

    def mark_trained(self, project: str, annotation_ids: list[int], version: str) -> None:
        with self._connect() as db:
            db.executemany(
                "UPDATE corrections SET trained_in = ? WHERE project = ? AND annotation_id = ?",
                [(version, project, a) for a in annotation_ids],
            )

    def request_training(self, project: str, reason: str) -> None:
        """Remember that a job is wanted, so it survives Redis being away."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO training_requests VALUES (?, ?, ?)",
                (project, time.time(), reason),
            )

    def pending_requests(self) -> list[tuple[str, str]]:
        with self._connect() as db:
            return db.execute("SELECT project, reason FROM training_requests").fetchall()

    def clear_request(self, project: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM training_requests WHERE project = ?", (project,))

    def last_stored_at(self, project: str) -> float | None:
        """When the project's newest live annotation was stored (None: it has none)."""
        with self._connect() as db:
            (last,) = db.execute(
                "SELECT MAX(stored_at) FROM corrections WHERE project = ? AND deleted = 0",
                (project,),
            ).fetchone()
        return last

    def labelled_count(self, project: str) -> int:
        """Live annotations of a project that name a class."""
        with self._connect() as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM corrections WHERE project = ? AND deleted = 0 "
                "AND label IS NOT NULL",
                (project,),
            ).fetchone()
        return count

    def remember_label_config(self, project: str, config: str) -> None:
        """Keep the project's label config as last seen (written only when it changed)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT label_config FROM label_configs WHERE project = ?", (project,)
            ).fetchone()
            if row is None or row[0] != config:
                db.execute(
                    "INSERT OR REPLACE INTO label_configs VALUES (?, ?, ?)",
                    (project, config, time.time()),
                )

    def label_config(self, project: str) -> str | None:
        row = (
            self._db()
            .execute("SELECT label_config FROM label_configs WHERE project = ?", (project,))
            .fetchone()
        )
        return row[0] if row else None

    def record_edited_top3(
        self,
        project: str,
        annotation_id: int,
        target: np.ndarray,
        version: str,
        top: list[tuple[str, float]],
    ) -> bool:
        """Keep the top-3 `version` gave with the annotation's map `target`; False (nothing
        kept) when the stored correction is gone or its map is no longer `target`: the
        annotator changed it meanwhile, and the next round computes it again."""
        blob = np.ascontiguousarray(target, dtype=np.float32).tobytes()
        with self._connect() as db:
            row = db.execute(
                "SELECT stored_at, target FROM corrections WHERE project = ? "
                "AND annotation_id = ? AND deleted = 0",
                (project, annotation_id),
            ).fetchone()
            if row is None or row[1] != blob:
                return False
            db.execute(
                "INSERT OR REPLACE INTO edited_top3 VALUES (?, ?, ?, ?, ?, ?)",
                (
                    project,
                    annotation_id,
                    row[0],
                    version,
                    json.dumps([[name, float(p)] for name, p in top]),
                    time.time(),
                ),
            )
            return True

    def edited_top3(self, project: str) -> dict[int, dict[str, Any]]:
        """Per annotation id, the top-3 the model gave with the map as it is stored now
        (``{"model_version", "top3": [[class, probability], ...], "computed_at"}``); a
        correction replaced since its top-3 was computed has none."""
        rows = (
            self._db()
            .execute(
                "SELECT t.annotation_id, t.model_version, t.top3, t.computed_at "
                "FROM edited_top3 t JOIN corrections c ON c.project = t.project "
                "AND c.annotation_id = t.annotation_id AND c.stored_at = t.stored_at "
                "WHERE t.project = ? AND c.deleted = 0",
                (project,),
            )
            .fetchall()
        )
        return {
            aid: {"model_version": version, "top3": json.loads(top3), "computed_at": at}
            for aid, version, top3, at in rows
        }

    def summary(self) -> dict[str, Any]:
        """Counts per project, for /status."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT project, SUM(edited), "
                "SUM(CASE WHEN edited = 0 AND target IS NOT NULL THEN 1 ELSE 0 END), "
                "SUM(CASE WHEN edited = 1 AND trained_in IS NULL THEN 1 ELSE 0 END), "
                "SUM(CASE WHEN label IS NOT NULL THEN 1 ELSE 0 END) "
                "FROM corrections WHERE deleted = 0 GROUP BY project"
            ).fetchall()
        return {
            p: {
                "corrections": int(e or 0),
                "confirmations": int(c or 0),
                "untrained": int(u or 0),
                "labelled": int(n or 0),
            }
            for p, e, c, u, n in rows
        }
