"""Annotators' corrections: from a Label Studio annotation to a durable map-sized target.

A correction is the attention brush as the annotator left it. The editor keeps the graded alpha
of the pre-annotation, sets painted pixels to 255 and erased ones to 0, and a stroke painted
without selecting the predicted region becomes a second brush result with the same label, so
every brush result under the attention label is merged (pixel-wise maximum) before the map is
averaged down to the model's map size. A result's ``origin`` says whether a human edited it: an
annotation whose brushes all come unedited from the prediction is a confirmation; it is kept
(its class label is still useful) but does not count as a correction.

The store is SQLite in MODEL_DIR: durable across restarts, transactional, and independent of
Redis, so corrections keep arriving while Redis is down.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.brush import BrushDecodeError, decode_rle
from backend.label_config import Targets

EDITED_ORIGINS = {"prediction-changed", "manual"}


class CorrectionError(ValueError):
    """An annotation that cannot become a target; the message says which result and why."""

    status = 400  # the HTTP status of the webhook refused for it


class BrushTooLarge(CorrectionError):
    """A brush whose declared size is over the limit; refused before anything is decoded."""

    status = 413


@dataclass(frozen=True)
class Correction:
    """One annotation's target and where it came from."""

    project: str
    annotation_id: int
    task_id: int
    image: str  # the task's image reference, as Label Studio gave it
    label: str | None  # the annotated class, if the annotation has one
    target: np.ndarray  # (h, w) float32 in [0, 1]
    edited: bool  # a human changed the brush (False: an unedited prediction, a confirmation)
    model_version: str | None  # the version whose pre-annotation was edited
    updated_at: str | None = None


MAX_BRUSHES_FACTOR = 8
"""An annotation's attention brushes may hold this many times ABN_BRUSH_MAX_PIXELS in all: a
few strokes at the largest image size (each stroke made without selecting the predicted region
is a result of its own), many on usual images, and a bounded time to decode (~0.1 s a brush at
the limit). Without it, a body of a thousand small uniform streams declaring the largest size
would take minutes."""


def brush_alpha(
    results: list[dict[str, Any]], targets: Targets, max_pixels: int | None = None
) -> tuple[np.ndarray, bool] | None:
    """All attention brushes of an annotation merged by maximum, and whether any was edited.

    None when the annotation has no attention brush (the annotator erased it all is not that:
    an emptied brush still arrives as a result). Sizes are checked before anything is decoded:
    a brush over `max_pixels`, or brushes over ``MAX_BRUSHES_FACTOR * max_pixels`` in all,
    raise :class:`BrushTooLarge`; brushes of different sizes a :class:`CorrectionError`.
    """
    brushes = []
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            raise CorrectionError(f"result {index} must be an object")
        if result.get("type") != "brushlabels" or result.get("from_name") != targets.brush:
            continue
        value = result.get("value") or {}
        labels = value.get("brushlabels") if isinstance(value, dict) else None
        if not isinstance(labels, list) or targets.label not in labels:
            continue
        where = f"brush result {index} ({result.get('id')})"
        width, height = result.get("original_width"), result.get("original_height")
        for name, side in (("original_width", width), ("original_height", height)):
            if isinstance(side, bool) or not isinstance(side, int):
                raise CorrectionError(f"{where}: {name} must be an integer")
        if max_pixels is not None and width * height > max_pixels:
            raise BrushTooLarge(
                f"{where} is {width}x{height} ({width * height} pixels), more than "
                f"ABN_BRUSH_MAX_PIXELS={max_pixels}"
            )
        if brushes and (width, height) != brushes[0][2:4]:
            raise CorrectionError(
                f"brush result {index} is {width}x{height}, another brush of the same image is "
                f"{brushes[0][2]}x{brushes[0][3]}"
            )
        brushes.append((where, value, width, height, result.get("origin", "manual")))
    total = sum(width * height for _, _, width, height, _ in brushes)
    if max_pixels is not None and total > MAX_BRUSHES_FACTOR * max_pixels:
        raise BrushTooLarge(
            f"the annotation's {len(brushes)} attention brushes hold {total} pixels in all, "
            f"more than {MAX_BRUSHES_FACTOR} x ABN_BRUSH_MAX_PIXELS={max_pixels}"
        )
    merged: np.ndarray | None = None
    edited = False
    for where, value, width, height, origin in brushes:
        try:
            alpha = decode_rle(value.get("rle"), height, width)
        except BrushDecodeError as exc:
            raise CorrectionError(f"{where}: {exc}") from exc
        merged = alpha if merged is None else np.maximum(merged, alpha, out=merged)
        edited |= origin in EDITED_ORIGINS
    return None if merged is None else (merged, edited)


def chosen_class(results: list[dict[str, Any]], targets: Targets) -> str | None:
    for result in results:
        if not isinstance(result, dict):
            continue
        if result.get("type") == "choices" and result.get("from_name") == targets.choices:
            value = result.get("value")
            choices = value.get("choices") if isinstance(value, dict) else None
            if isinstance(choices, list) and choices and isinstance(choices[0], str):
                return choices[0]
    return None


def correction_from_annotation(
    project: str,
    annotation: dict[str, Any],
    task: dict[str, Any],
    targets: Targets,
    map_size: int,
    *,
    max_pixels: int | None = None,
) -> Correction | None:
    """The target of one annotation, or None when it holds no attention brush.

    A brush over `max_pixels` (original_width * original_height) raises :class:`BrushTooLarge`
    before it is decoded.
    """
    results = annotation.get("result")
    if not isinstance(results, list):
        raise CorrectionError("annotation.result must be a list of results")
    updated_at = annotation.get("updated_at")
    if updated_at is not None and not isinstance(updated_at, str):
        raise CorrectionError("annotation.updated_at must be a string")
    brush = brush_alpha(results, targets, max_pixels)
    if brush is None:
        return None
    alpha, edited = brush
    data = task.get("data")
    image = data.get(targets.data_key) if isinstance(data, dict) else None
    if not isinstance(image, str):
        raise CorrectionError(f"task.data.{targets.data_key} (the image) is missing")
    predictions = task.get("predictions")
    versions = [
        p.get("model_version")
        for p in (predictions if isinstance(predictions, list) else [])
        if isinstance(p, dict)
    ]
    return Correction(
        project=project,
        annotation_id=int(annotation["id"]),
        task_id=int(task["id"]),
        image=image,
        label=chosen_class(results, targets),
        target=alpha_to_map(alpha, map_size),
        edited=edited,
        model_version=next((v for v in reversed(versions) if v and isinstance(v, str)), None),
        updated_at=updated_at,
    )


def alpha_to_map(alpha: np.ndarray, size: int) -> np.ndarray:
    """A brush's alpha (H, W) uint8 to the (size, size) float32 target: ``mask_to_map``'s values
    at about no memory beyond the alpha itself.

    ``mask_to_map`` converts the whole mask to float32 and clips a copy before it averages:
    9 bytes per pixel, 2.3 GB for a 16384x16384 brush. Here the cell averages (``area``
    interpolation: each output cell averages the input rows and columns it overlaps) are
    exact integer sums over one band of rows at a time; a brush smaller than the map in either
    direction is bilinearly upsampled as ``resize_map`` does, from the few pixels it reads.
    """
    height, width = alpha.shape
    values = _bilinear(alpha, size) if height < size or width < size else _area(alpha, size)
    if alpha.max() > 1:  # mask_to_map: 0..255 opacity; a 0/1 mask is taken as it is
        values /= 255.0
    return values.astype(np.float32)


def _bands(length: int, size: int) -> list[tuple[int, int]]:
    """The input range each output cell of adaptive average pooling covers."""
    return [((i * length) // size, -(-((i + 1) * length) // size)) for i in range(size)]


def _area(alpha: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((size, size), dtype=np.float64)
    columns = _bands(alpha.shape[1], size)
    starts = np.array([c[0] for c in columns])
    ends = np.array([c[1] for c in columns])
    for i, (top, bottom) in enumerate(_bands(alpha.shape[0], size)):
        band = alpha[top:bottom].sum(axis=0, dtype=np.int64)
        cumulative = np.concatenate(([0], np.cumsum(band)))
        out[i] = (cumulative[ends] - cumulative[starts]) / ((bottom - top) * (ends - starts))
    return out


def _bilinear(alpha: np.ndarray, size: int) -> np.ndarray:
    """torch's bilinear interpolation (align_corners=False), reading only the pixels it needs."""
    (y0, y1, wy), (x0, x1, wx) = _linear(alpha.shape[0], size), _linear(alpha.shape[1], size)
    rows = np.unique(np.concatenate([y0, y1]))
    cols = np.unique(np.concatenate([x0, x1]))
    small = alpha[np.ix_(rows, cols)].astype(np.float64)
    r0, r1 = np.searchsorted(rows, y0), np.searchsorted(rows, y1)
    c0, c1 = np.searchsorted(cols, x0), np.searchsorted(cols, x1)
    top = small[r0][:, c0] * (1 - wx) + small[r0][:, c1] * wx
    bottom = small[r1][:, c0] * (1 - wx) + small[r1][:, c1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def _linear(length: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear interpolation from `length` to `size` points."""
    source = np.maximum((np.arange(size) + 0.5) * (length / size) - 0.5, 0.0)
    low = np.minimum(source.astype(np.int64), length - 1)
    high = np.minimum(low + 1, length - 1)
    return low, high, source - low


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
"""


class CorrectionStore:
    """Corrections per project, keyed by annotation id: storing an event twice changes nothing."""

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
        target = np.ascontiguousarray(c.target, dtype=np.float32)
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
                if (old_target, old_label, bool(old_edited)) == (
                    target.tobytes(),
                    c.label,
                    c.edited,
                ):
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
                    target.tobytes(),
                    target.shape[0],
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
        """The live corrections and confirmations of a project, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT annotation_id, task_id, image, label, target, map_size, edited, "
                "model_version, updated_at FROM corrections WHERE project = ? AND deleted = 0 "
                "ORDER BY stored_at",
                (project,),
            ).fetchall()
        return [
            Correction(
                project=project,
                annotation_id=aid,
                task_id=tid,
                image=image,
                label=label,
                target=np.frombuffer(blob, dtype=np.float32).reshape(size, -1).copy(),
                edited=bool(edited),
                model_version=version,
                updated_at=updated,
            )
            for aid, tid, image, label, blob, size, edited, version, updated in rows
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

    def projects(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT project FROM corrections")]

    def summary(self) -> dict[str, Any]:
        """Counts per project, for /status."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT project, SUM(edited), SUM(1 - edited), "
                "SUM(CASE WHEN edited = 1 AND trained_in IS NULL THEN 1 ELSE 0 END) "
                "FROM corrections WHERE deleted = 0 GROUP BY project"
            ).fetchall()
        return {
            p: {"corrections": int(e or 0), "confirmations": int(c or 0), "untrained": int(u or 0)}
            for p, e, c, u in rows
        }
