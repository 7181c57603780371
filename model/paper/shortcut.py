"""Shortcut datasets: which class each image's cue names, and accuracy split by it.

A shortcut dataset (``decoy-digits``, ``texture-shapes``, ``background-shapes``) records, per
image, the class its cue (a coloured patch, a texture) points to, in ``cues.json`` at the
dataset's root. In TRAIN the cue mostly names the label; in the test split it is random.
Splitting accuracy by whether the cue names another class ("conflicting") tells whether a
network learnt the shortcut that the human maps are meant to correct: a network that uses it is
right much less often on conflicting images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.data import Sample

CUES_FILE = "cues.json"


def dataset_root(sample: Sample) -> Path:
    """DIR of DIR/<split>/<class>/<name>, where the cues file lies (through a carved link)."""
    return Path(sample.image).resolve().parents[2]


def has_cues(samples: Sequence[Sample]) -> bool:
    """Whether these samples come from a shortcut dataset (one with a cues file)."""
    return bool(samples) and (dataset_root(samples[0]) / CUES_FILE).is_file()


def conflicting(samples: Sequence[Sample], classes: Sequence[str]) -> np.ndarray:
    """Per sample: whether its cue names a class other than its label."""
    if not samples:
        return np.zeros(0, dtype=bool)
    root = dataset_root(samples[0])
    cues = json.loads((root / CUES_FILE).read_text())
    return np.array(
        [
            cues[Path(s.image).resolve().relative_to(root).as_posix()] != classes[s.label]
            for s in samples
        ],
        dtype=bool,
    )


def breakdown_lines(correct: dict[str, np.ndarray], flags: np.ndarray) -> list[str]:
    """A markdown table: top-1 on conflicting vs agreeing test images, per model."""
    lines = [
        "| Model | top-1, cue names another class [%] | top-1, cue names the label [%] |",
        "|---|---|---|",
    ]
    for name, right in correct.items():
        cells = [
            f"{100 * right[mask].mean():.2f} ({int(mask.sum())})" if mask.any() else "-"
            for mask in (flags, ~flags)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
