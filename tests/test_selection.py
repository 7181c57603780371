"""model/selection.py: what each strategy puts first."""

from __future__ import annotations

import numpy as np
import pytest

from model.selection import Candidate, SelectionError, map_entropy, select

POOL = [
    Candidate(1, 0.9, "cat", labelled="cat"),
    Candidate(2, 0.4, "cat", labelled="dog"),  # wrong, unsure
    Candidate(3, 0.2, "dog"),  # the least confident
    Candidate(4, 0.95, "dog", labelled="fox"),  # wrong, sure
    Candidate(5, 0.6, "fox"),
]


def ids(chosen: list[Candidate]) -> list[int]:
    return [c.task_id for c in chosen]


def test_least_confident_first() -> None:
    assert ids(select(POOL, "least-confident", 3)) == [3, 2, 5]


def test_misclassified_first_then_the_least_confident() -> None:
    assert ids(select(POOL, "misclassified", 3)) == [2, 4, 3]


def test_random_is_seeded_and_takes_what_there_is() -> None:
    first = ids(select(POOL, "random", 5, seed=1))
    assert sorted(first) == [1, 2, 3, 4, 5] and first == ids(select(POOL, "random", 5, seed=1))
    assert ids(select(POOL, "random", 99, seed=1)) == first  # a size beyond the pool: all


def test_map_entropy_puts_the_most_spread_map_first() -> None:
    flat, peaked = np.ones((4, 4)), np.zeros((4, 4))
    peaked[1, 1] = 1.0
    half = np.zeros((4, 4))
    half[:2] = 1.0
    assert map_entropy(flat) == pytest.approx(1.0) and map_entropy(peaked) == 0.0
    pool = [Candidate(1, 0.5, "a", attention=peaked), Candidate(2, 0.5, "a", attention=flat),
            Candidate(3, 0.5, "a", attention=half), Candidate(4, 0.1, "a")]  # fmt: skip
    assert ids(select(pool, "map-entropy", 3)) == [2, 3, 1]
    with pytest.raises(SelectionError, match="needs the model's maps"):
        select([Candidate(4, 0.1, "a")], "map-entropy", 1)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(SelectionError, match="unknown strategy 'best'"):
        select(POOL, "best", 3)
    with pytest.raises(SelectionError, match="at least 1"):
        select(POOL, "random", 0)
