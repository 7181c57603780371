"""Which tasks a round of corrections should cover: the strategies of an active-learning round.

Each strategy ranks candidate tasks from what the served model said about them (its score, its
class, its attention map) and what annotators said (a class, if any); the round takes the first
N. Nothing here knows where the tasks live.

- ``least-confident``: the lowest top-1 probability first (the paper's CUB sorting);
- ``misclassified``: tasks whose labelled class the model gets wrong, least confident first (the
  paper's ImageNet choice), then the rest by confidence;
- ``map-entropy``: the most spread-out attention maps first (a model that looks everywhere has
  not found what to look at);
- ``random``: the baseline every other strategy must beat, seeded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.errors import UserError

STRATEGIES = ("least-confident", "misclassified", "map-entropy", "random")


class SelectionError(UserError, ValueError):
    """A strategy that does not exist, or a round with nothing to select."""


@dataclass(frozen=True)
class Candidate:
    """What is known of one task when a round is chosen."""

    task_id: int
    score: float  # the model's top-1 probability
    predicted: str | None  # the model's class
    labelled: str | None = None  # the annotators' class, if any
    attention: np.ndarray | None = None  # the model's map (any size), for map-entropy


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
    candidates: Sequence[Candidate], strategy: str, size: int, seed: int = 0
) -> list[Candidate]:
    """The first `size` candidates by `strategy`, in the order to label them."""
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
    else:
        ranked = sorted(candidates, key=lambda c: c.task_id)
        random.Random(seed).shuffle(ranked)
    return ranked[:size]
