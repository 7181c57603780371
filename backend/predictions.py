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

import uuid
from typing import Any

import numpy as np

from backend.brush import encode_rle
from backend.label_config import Targets
from backend.serving import Prediction


def upsample(attention: np.ndarray, width: int, height: int) -> np.ndarray:
    """The (h, w) map at (height, width), clamped to [0, 1].

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


def attention_alpha(attention: np.ndarray, width: int, height: int, levels: int) -> np.ndarray:
    """The brush's alpha channel: the map at the image's size, quantised.

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
        alpha[band] = quantise(
            _interpolate(small, y0[band], y1[band], fy[band], x0, x1, fx), levels
        )
    return alpha


def top3_lines(prediction: Prediction) -> list[str]:
    """The top-3 as the annotator reads them: ``1. cat  81.2%``."""
    return [f"{rank}. {name}  {100 * p:.1f}%" for rank, (name, p) in enumerate(prediction.top, 1)]


def to_label_studio(
    prediction: Prediction, width: int, height: int, targets: Targets, levels: int = 8
) -> dict[str, Any]:
    """One entry of /predict's ``results``: brush, class, top-3, score and model version.

    `width` and `height` are the image's original size, as the editor loads it (after EXIF
    rotation), so the mask lines up with the picture.
    """
    alpha = attention_alpha(prediction.attention, width, height, levels)
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
        result.append(
            {
                "id": _region_id(),
                "from_name": targets.top3,
                "to_name": targets.image,
                "type": "textarea",
                "value": {"text": lines},
                "score": score,
                # The editor honours a result's own readonly flag: the lines show, greyed,
                # and cannot be edited or deleted (the TextArea's input is disabled).
                "readonly": True,
            }
        )
    return {"result": result, "score": score, "model_version": prediction.version}


def empty_prediction(version: str) -> dict[str, Any]:
    """The entry of a task that could not be predicted: nothing to show, lowest score."""
    return {"result": [], "score": 0.0, "model_version": version}


def _region_id() -> str:
    return uuid.uuid4().hex[:10]
