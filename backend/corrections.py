"""Annotators' corrections: from a Label Studio annotation to a map-sized target.

A correction is the attention brush as the annotator left it. The editor keeps the graded alpha
of the pre-annotation, sets painted pixels to 255 and erased ones to 0, and a stroke painted
without selecting the predicted region becomes a second brush result with the same label, so
every brush result under the attention label is merged (pixel-wise maximum) before the map is
averaged down to the model's map size. A result's ``origin`` says whether a human edited it: an
annotation whose brushes all come unedited from the prediction is a confirmation; it is kept
(its class label is still useful) but does not count as a correction. An annotation with a
class and no brush (a new project's, before it has a model) is kept as a label alone: it is
what a project's first model learns from.

``backend/store.py`` keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.brush import (
    BrushDecodeError,
    Stroke,
    decode_rle,
    paint_strokes,
    stroke_cost,
    strokes,
)
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
    target: np.ndarray | None  # (h, w) float32 in [0, 1]; None: a class label alone
    edited: bool  # a human changed the brush (False: an unedited prediction, a confirmation)
    model_version: str | None  # the version whose pre-annotation was edited
    updated_at: str | None = None
    # The version that learnt from this annotation or was judged on it; None: no version has
    # yet (new since the last published round, or changed since).
    trained_in: str | None = None


MAX_BRUSHES_FACTOR = 8
"""An annotation's attention brushes may hold this many times ABN_BRUSH_MAX_PIXELS in all: a
few strokes at the largest image size (each stroke made without selecting the predicted region
is a result of its own), many on usual images, and a bounded time to decode (~0.1 s a brush at
the limit). Without it, a body of a thousand small uniform streams declaring the largest size
would take minutes."""


MAX_STROKE_FACTOR = 64
"""A draft's strokes (``touches``) may cost this many times ABN_BRUSH_MAX_PIXELS to paint in
all (``backend/brush.py``'s ``stroke_cost``): at the default, about a second; an annotator's
strokes on a usual image cost a thousandth of it."""
MAX_TOUCH_POINTS = 50_000
"""Stroke points a draft may hold in all: each costs a few microseconds to paint, and an
annotator's stroke holds a few hundred."""


@dataclass(frozen=True)
class _Brush:
    """One attention brush result, its size checked, its strokes (a draft's) read."""

    where: str
    value: dict[str, Any]
    width: int
    height: int
    origin: str
    strokes: list[Stroke]


def brush_alpha(
    results: list[dict[str, Any]], targets: Targets, max_pixels: int | None = None
) -> tuple[np.ndarray, bool] | None:
    """All attention brushes of an annotation (or a draft) merged by maximum, and whether any
    was edited.

    None when the annotation has no attention brush (the annotator erased it all is not that:
    an emptied brush still arrives as a result). A draft's brush is its RLE with its strokes
    painted over it, as the editor paints them when it submits (none, or no RLE at all, for a
    region drawn since). Sizes are checked before anything is decoded: a brush over
    `max_pixels`, brushes over ``MAX_BRUSHES_FACTOR * max_pixels`` in all, or strokes over
    :data:`MAX_TOUCH_POINTS` or ``MAX_STROKE_FACTOR * max_pixels`` raise
    :class:`BrushTooLarge`; brushes of different sizes a :class:`CorrectionError`.
    """
    brushes = attention_brushes(results, targets, max_pixels)
    merged: np.ndarray | None = None
    edited = False
    for brush in brushes:
        value = brush.value
        try:
            if value.get("rle") is None and brush.strokes:
                alpha = np.zeros((brush.height, brush.width), np.uint8)
            else:
                alpha = decode_rle(value.get("rle"), brush.height, brush.width)
        except BrushDecodeError as exc:
            raise CorrectionError(f"{brush.where}: {exc}") from exc
        alpha = paint_strokes(alpha, brush.strokes)
        merged = alpha if merged is None else np.maximum(merged, alpha, out=merged)
        edited |= brush.origin in EDITED_ORIGINS
    return None if merged is None else (merged, edited)


def attention_brushes(
    results: list[dict[str, Any]], targets: Targets, max_pixels: int | None
) -> list[_Brush]:
    """The results under the attention label, their sizes and strokes within the limits."""
    brushes: list[_Brush] = []
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
        if brushes and (width, height) != (brushes[0].width, brushes[0].height):
            raise CorrectionError(
                f"brush result {index} is {width}x{height}, another brush of the same image is "
                f"{brushes[0].width}x{brushes[0].height}"
            )
        try:
            drawn = strokes(value["touches"], width, height) if "touches" in value else []
        except BrushDecodeError as exc:
            raise CorrectionError(f"{where}: {exc}") from exc
        brushes.append(_Brush(where, value, width, height, result.get("origin", "manual"), drawn))
    if max_pixels is not None:
        check_budget(brushes, max_pixels)
    return brushes


def check_budget(brushes: list[_Brush], max_pixels: int) -> None:
    """:class:`BrushTooLarge` unless the brushes decode and their strokes paint in bounded
    time and memory."""
    total = sum(b.width * b.height for b in brushes)
    if total > MAX_BRUSHES_FACTOR * max_pixels:
        raise BrushTooLarge(
            f"the annotation's {len(brushes)} attention brushes hold {total} pixels in all, "
            f"more than {MAX_BRUSHES_FACTOR} x ABN_BRUSH_MAX_PIXELS={max_pixels}"
        )
    points = sum(len(s.points) for b in brushes for s in b.strokes)
    if points > MAX_TOUCH_POINTS:
        raise BrushTooLarge(
            f"the brushes' strokes hold {points} points in all, more than {MAX_TOUCH_POINTS}"
        )
    cost = sum(stroke_cost(b.strokes, b.width, b.height) for b in brushes)
    if cost > MAX_STROKE_FACTOR * max_pixels:
        raise BrushTooLarge(
            f"the brushes' strokes would paint about {cost} pixels, more than "
            f"{MAX_STROKE_FACTOR} x ABN_BRUSH_MAX_PIXELS={max_pixels}"
        )


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


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's most recently updated annotation that was not cancelled (skipped)."""
    annotations = task.get("annotations") or []
    return most_recent(
        [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    )


def most_recent(records: list[Any]) -> dict[str, Any] | None:
    """The most recently saved of `records` (annotations, drafts) that holds a result list:
    by ``updated_at`` (else ``created_at``), then by id, the later one."""
    usable = [r for r in records if isinstance(r, dict) and isinstance(r.get("result"), list)]
    if not usable:
        return None
    return max(
        usable,
        key=lambda r: (str(r.get("updated_at") or r.get("created_at") or ""), r.get("id") or 0),
    )


def correction_from_annotation(
    project: str,
    annotation: dict[str, Any],
    task: dict[str, Any],
    targets: Targets,
    map_size: int,
    *,
    max_pixels: int | None = None,
) -> Correction | None:
    """The target of one annotation; a label alone when it has a class but no attention brush;
    None when it has neither.

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
    label = chosen_class(results, targets)
    if brush is None and label is None:
        return None
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
        label=label,
        target=None if brush is None else alpha_to_map(brush[0], map_size),
        edited=brush is not None and brush[1],
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
