"""Which tasks a round of corrections should cover: the strategies of an active-learning round.

Each strategy ranks candidate tasks from what the served model said about them (its score, its
class, its attention map) and what annotators said (a class, if any); the round takes the first
N. Nothing here knows where the tasks live.

- ``least-confident``: the lowest top-1 probability first (the paper's CUB sorting);
- ``misclassified``: tasks whose labelled class the model gets wrong, least confident first (the
  paper's ImageNet choice), then the rest by confidence;
- ``map-entropy``: the most spread-out attention maps first (a model that looks everywhere has
  not found what to look at);
- ``map-disagreement``: the model's maps least like any map annotators left on a corrected task
  of the class it predicts first (where it looks where people have not said to look), tasks of
  a class with no corrected map before them, least confident first;
- ``class-balanced``: least confident first within each class the model predicts, the classes
  taking turns (the class holding the least confident task first), so that a round's human maps
  cover every class instead of bunching on the one the model finds hardest;
- ``random``: the baseline every other strategy must beat, seeded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest

import numpy as np
from PIL import Image

from model.errors import UserError

STRATEGIES = (
    "least-confident",
    "misclassified",
    "map-entropy",
    "map-disagreement",
    "class-balanced",
    "random",
)
COMPARED_SIZE = 16
"""Maps of any size are compared on a COMPARED_SIZE square grid: coarse enough that a brush at
full image size and a target at the map's size meet, fine enough to tell where a map looks."""


class SelectionError(UserError, ValueError):
    """A strategy that does not exist, or a round with nothing to select."""


@dataclass(frozen=True)
class Candidate:
    """What is known of one task when a round is chosen."""

    task_id: int
    score: float  # the model's top-1 probability
    predicted: str | None  # the model's class
    labelled: str | None = None  # the annotators' class, if any
    attention: np.ndarray | None = None  # the model's map (any size), for the map strategies


@dataclass(frozen=True)
class CorrectedMap:
    """A task annotators corrected: its class and the map they left (any size, in [0, 1])."""

    labelled: str
    attention: np.ndarray


def compared(attention: np.ndarray) -> np.ndarray:
    """`attention` resampled to the grid on which maps of different sizes are compared."""
    values = np.asarray(attention, dtype=np.float32)
    grid = Image.fromarray(values).resize((COMPARED_SIZE, COMPARED_SIZE), Image.BILINEAR)
    return np.asarray(grid, dtype=np.float32)


def map_disagreement(attention: np.ndarray, corrected: Sequence[np.ndarray]) -> float:
    """The mean squared distance from `attention` to the nearest of the `corrected` maps
    (already :func:`compared`); infinite with none, as nothing is known of such maps."""
    if not corrected:
        return float("inf")
    mine = compared(attention)
    return float(min(np.mean((mine - other) ** 2) for other in corrected))


def map_entropy(attention: np.ndarray) -> float:
    """Entropy of the map taken as a distribution over its cells, divided by its maximum
    (1.0: uniform, the map says nothing; 0.0: all on one cell)."""
    values = np.clip(np.asarray(attention, dtype=np.float64).ravel(), 0.0, None)
    total = values.sum()
    if values.size < 2 or total <= 0:
        return 1.0
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(values.size))


def select(
    candidates: Sequence[Candidate],
    strategy: str,
    size: int,
    seed: int = 0,
    corrected: Sequence[CorrectedMap] = (),
) -> list[Candidate]:
    """The first `size` candidates by `strategy`, in the order to label them; `corrected`: the
    maps annotators left on corrected tasks (what ``map-disagreement`` compares with)."""
    if strategy not in STRATEGIES:
        raise SelectionError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if size < 1:
        raise SelectionError(f"a round needs a size of at least 1, got {size}")
    by_score = sorted(candidates, key=lambda c: (c.score, c.task_id))
    if strategy == "least-confident":
        ranked = by_score
    elif strategy == "misclassified":
        wrong = [c for c in by_score if c.labelled is not None and c.labelled != c.predicted]
        ranked = wrong + [c for c in by_score if c not in wrong]
    elif strategy == "map-entropy":
        with_map = [c for c in candidates if c.attention is not None]
        if not with_map:
            raise SelectionError("map-entropy needs the model's maps of the candidate tasks")
        ranked = sorted(with_map, key=lambda c: (-map_entropy(c.attention), c.task_id))
    elif strategy == "map-disagreement":
        with_map = [c for c in candidates if c.attention is not None]
        if not with_map:
            raise SelectionError("map-disagreement needs the model's maps of the candidate tasks")
        by_class: dict[str, list[np.ndarray]] = {}
        for done in corrected:
            by_class.setdefault(done.labelled, []).append(compared(done.attention))
        far = {
            c.task_id: map_disagreement(c.attention, by_class.get(c.predicted or "", []))
            for c in with_map
        }
        ranked = sorted(with_map, key=lambda c: (-far[c.task_id], c.score, c.task_id))
    elif strategy == "class-balanced":
        by_predicted: dict[str, list[Candidate]] = {}
        for c in by_score:
            by_predicted.setdefault(c.predicted or "", []).append(c)
        turns = zip_longest(
            *sorted(by_predicted.values(), key=lambda q: (q[0].score, q[0].task_id))
        )
        ranked = [c for turn in turns for c in turn if c is not None]
    else:
        ranked = sorted(candidates, key=lambda c: c.task_id)
        random.Random(seed).shuffle(ranked)
    return ranked[:size]
