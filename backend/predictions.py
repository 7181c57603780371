"""A model prediction as Label Studio results: the attention brush, the class, the top-3.

The attention map (h, w) in (0, 1) is upsampled bilinearly to the image's original size and
quantised to `levels` evenly spaced alpha values 0..255. The alpha keeps the map's absolute
scale (alpha = 255 * attention, rounded to a level), not a per-image min-max stretch: an
annotator's edit then reads back as a map on the model's own scale, and a map the model is
unsure about looks faint. Level 0 is transparent, i.e. outside the brush region.

Quantising to few levels keeps the RLE short (runs are long), which is what Label Studio stores
and ships to the browser; 8 levels already show the map's shape in the editor.

Plain numpy on purpose: this runs on the request's thread, and a torch op there would start
an OpenMP thread team per request thread, whose spinning slows the model's own passes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.brush import encode_rle
from backend.images import ImageFetchError, ImageLoader, LoadedImage
from backend.label_config import Targets
from backend.prometheus import Metrics
from backend.schemas import json_type
from backend.serving import Prediction, ServedModel, Snapshot

if TYPE_CHECKING:
    from model.edited_map import EditedPrediction

log = logging.getLogger(__name__)

FETCH_THREADS = 8  # images of one batch downloaded at once


def upsample(attention: np.ndarray, width: int, height: int) -> np.ndarray:
    """The (h, w) map at (height, width), clamped to [0, 1]: the reference that
    :func:`attention_alpha` computes band by band (tests hold them equal).

    Bilinear with half-pixel centres, as ``F.interpolate(..., mode="bilinear",
    align_corners=False)``, done separably (rows, then columns) to keep temporaries small.
    """
    small = _as_map(attention)
    if small.shape == (height, width):
        return small.copy()
    y0, y1, fy = _source_index(small.shape[0], height)
    return _interpolate(small, y0, y1, fy, *_source_index(small.shape[1], width))


def _as_map(attention: np.ndarray) -> np.ndarray:
    small = np.clip(np.asarray(attention, dtype=np.float32), 0.0, 1.0)
    if small.ndim != 2 or small.size == 0:
        raise ValueError(f"an attention map must be a non-empty 2-D array, got {small.shape}")
    return small


def _interpolate(
    small: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
    fy: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    fx: np.ndarray,
) -> np.ndarray:
    """The output rows that `y0`, `y1`, `fy` describe, at every output column."""
    rows = small[y0] * (1 - fy)[:, None]
    rows += small[y1] * fy[:, None]
    out = rows[:, x0]
    out *= 1 - fx
    out += rows[:, x1] * fx
    return out


def _source_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices and the weight of the second (torch's rule)."""
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out)
    src = np.maximum(src - np.float32(0.5), np.float32(0.0))
    low = np.minimum(src.astype(np.intp), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (src - low).astype(np.float32)


def quantise(values: np.ndarray, levels: int) -> np.ndarray:
    """Values in [0, 1] to uint8 alpha on `levels` evenly spaced levels from 0 to 255."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    steps = levels - 1
    alpha = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * np.float32(steps)
    np.rint(alpha, out=alpha)
    if steps != 255:
        alpha *= np.float32(255.0 / steps)
        np.rint(alpha, out=alpha)
    return alpha.astype(np.uint8)


ROW_BAND = 256  # output rows upsampled at once by attention_alpha


def attention_alpha(
    attention: np.ndarray, width: int, height: int, levels: int, floor: float = 0.0
) -> np.ndarray:
    """The brush's alpha channel: the map at the image's size, quantised.

    Values below `floor` (``ABN_BRUSH_FLOOR``) are drawn transparent (alpha 0): on an untrained
    or unsure model the lowest level otherwise tints every pixel of the photo. Values at or
    above it keep their level, so the graded round trip is unchanged there.

    Computed a band of rows at a time, each band exactly as :func:`upsample` computes it, so a
    brush costs about one byte a pixel: at 8000x8000 the whole float map and its temporaries
    (~700 MB) made the biggest allocation of a /predict.
    """
    small = _as_map(attention)
    y0, y1, fy = _source_index(small.shape[0], height)
    x0, x1, fx = _source_index(small.shape[1], width)
    alpha = np.empty((height, width), dtype=np.uint8)
    for start in range(0, height, ROW_BAND):
        band = slice(start, start + ROW_BAND)
        values = _interpolate(small, y0[band], y1[band], fy[band], x0, x1, fx)
        if floor > 0:
            values[values < floor] = 0.0
        alpha[band] = quantise(values, levels)
    return alpha


def top3_lines(prediction: Prediction | EditedPrediction) -> list[str]:
    """The top-3 as the annotator reads them: ``1. cat  81.2%``."""
    return [f"{rank}. {name}  {100 * p:.1f}%" for rank, (name, p) in enumerate(prediction.top, 1)]


def top3_result(lines: list[str], targets: Targets, score: float) -> dict[str, Any]:
    """The read-only ``textarea`` result that shows `lines` in the config's top-3 box."""
    return {
        "id": _region_id(),
        "from_name": targets.top3,
        "to_name": targets.image,
        "type": "textarea",
        "value": {"text": lines},
        "score": score,
        # The editor honours a result's own readonly flag: the lines show, greyed, and
        # cannot be edited or deleted (the TextArea's input is disabled).
        "readonly": True,
    }


def to_label_studio(
    prediction: Prediction,
    width: int,
    height: int,
    targets: Targets,
    levels: int = 8,
    floor: float = 0.0,
) -> dict[str, Any]:
    """One entry of /predict's ``results``: brush, class, top-3, score and model version.

    `width` and `height` are the image's original size, as the editor loads it (after EXIF
    rotation), so the mask lines up with the picture.
    """
    alpha = attention_alpha(prediction.attention, width, height, levels, floor)
    score = float(prediction.score)
    lines = top3_lines(prediction)
    common = {"to_name": targets.image, "original_width": width, "original_height": height}
    result: list[dict[str, Any]] = [
        {
            "id": _region_id(),
            "from_name": targets.brush,
            "type": "brushlabels",
            **common,
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": encode_rle(alpha),
                "brushlabels": [targets.label],
            },
            "score": score,
            "meta": {"text": ["; ".join(lines)]},
        },
        {
            "id": _region_id(),
            "from_name": targets.choices,
            "to_name": targets.image,
            "type": "choices",
            "value": {"choices": [prediction.label]},
            "score": score,
        },
    ]
    if targets.top3:
        result.append(top3_result(lines, targets, score))
    return {"result": result, "score": score, "model_version": prediction.version}


def empty_prediction(version: str) -> dict[str, Any]:
    """The entry of a task that could not be predicted: nothing to show, lowest score."""
    return {"result": [], "score": 0.0, "model_version": version}


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


class TaskPredictor:
    """Tasks in, Label Studio results out: a batch's images fetched in parallel, one forward
    pass, then each map encoded as a brush. Memory stays bounded however many tasks come."""

    def __init__(
        self,
        loader: ImageLoader,
        metrics: Metrics,
        batch_size: int,
        brush_levels: int,
        fetch_threads: int = FETCH_THREADS,
        brush_floor: float = 0.0,
    ) -> None:
        self.loader = loader
        self.metrics = metrics
        self.batch_size = max(1, batch_size)
        self.brush_levels = brush_levels
        self.brush_floor = brush_floor
        self._fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="abn-fetch")

    def predict(
        self,
        tasks: list[dict[str, Any]],
        targets: Targets,
        snap: Snapshot,
        project: object = None,
    ) -> list[dict[str, Any]]:
        """One Label Studio prediction per task, in order, all from snapshot `snap`.

        Tasks without an image get an empty entry; they are logged once per request, counted
        by reason, with the first of each reason.
        """
        metrics = self.metrics
        results: list[dict[str, Any]] = [empty_prediction(snap.version) for _ in tasks]
        failed: Counter[str] = Counter()
        first_failure: dict[str, str] = {}
        batch = self.batch_size
        size = snap.meta.image_size
        data_key = targets.data_key
        for start in range(0, len(tasks), batch):
            chunk = list(enumerate(tasks[start : start + batch], start))
            started = time.perf_counter()
            if len(chunk) == 1:
                loaded = [self.load_task_image(chunk[0][1], data_key, project, size)]
            else:
                loaded = list(
                    self._fetch_pool.map(
                        lambda item: self.load_task_image(item[1], data_key, project, size), chunk
                    )
                )
            ready: list[tuple[int, LoadedImage]] = []
            for (index, task), outcome in zip(chunk, loaded, strict=True):
                if isinstance(outcome, ImageFetchError):
                    metrics.count_error(outcome.reason)
                    failed[outcome.reason] += 1
                    if outcome.reason not in first_failure:
                        where = task.get("id", f"#{index}")
                        first_failure[outcome.reason] = f"task {where}: {outcome}"[:300]
                        bug = getattr(outcome, "bug", None)
                        if bug is not None:  # a loader bug: its traceback, once a request
                            log.error("%s", first_failure[outcome.reason], exc_info=bug)
                else:
                    ready.append((index, outcome))
            fetched = time.perf_counter()
            metrics.stage_latency.labels("fetch").observe(fetched - started)
            if not ready:
                continue
            predictions = ServedModel.predict_with(snap, [img.image for _, img in ready])
            predicted = time.perf_counter()
            metrics.stage_latency.labels("model").observe(predicted - fetched)
            metrics.batch_latency.observe(predicted - fetched)
            metrics.batch_size.observe(len(ready))
            for (index, img), prediction in zip(ready, predictions, strict=True):
                results[index] = to_label_studio(
                    prediction, img.width, img.height, targets, self.brush_levels, self.brush_floor
                )
            metrics.stage_latency.labels("encode").observe(time.perf_counter() - predicted)
            metrics.predictions.labels(snap.version).inc(len(ready))
        if failed:
            log.warning(
                "/predict: %d of %d tasks got no prediction (%s); first of each: %s",
                sum(failed.values()),
                len(tasks),
                ", ".join(f"{reason} {count}" for reason, count in failed.most_common()),
                "; ".join(first_failure[reason] for reason, _ in failed.most_common()),
            )
        return results

    def load_task_image(
        self, task: dict[str, Any], key: str, project: object, size: int
    ) -> LoadedImage | ImageFetchError:
        """The task's image, or the error that says why there is none (never raises).

        Only a copy at about the model's input `size` is kept, with the original width and height.
        """
        url = task["data"].get(key)
        if url is None:
            return ImageFetchError(f"task data has no {key!r} field", "missing")
        if not isinstance(url, str):
            return ImageFetchError(
                f"task data {key!r} must be a URL string, got {json_type(url)}", "missing"
            )
        try:
            return self.loader.load(url, project, task.get("id"), size=size)
        except ImageFetchError as exc:
            return exc
        except Exception as exc:  # a loader bug must not sink the other tasks of the batch
            error = ImageFetchError(f"unexpected error: {type(exc).__name__}: {exc}", "internal")
            error.bug = exc  # type: ignore[attr-defined]  # predict() logs the first traceback
            return error
