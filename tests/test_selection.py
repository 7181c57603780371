"""model/selection.py: what each strategy puts first."""

from __future__ import annotations

import numpy as np
import pytest

from model.selection import (
    Candidate,
    CorrectedMap,
    SelectionError,
    compared,
    map_disagreement,
    map_entropy,
    select,
)

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


def test_class_balanced_takes_each_predicted_class_in_turn_least_confident_first() -> None:
    pool = [Candidate(1, 0.10, "a"), Candidate(2, 0.15, "a"), Candidate(3, 0.20, "a"),
            Candidate(4, 0.50, "b"), Candidate(5, 0.90, "b"), Candidate(6, 0.60, "c"),
            Candidate(7, 0.30, None)]  # fmt: skip
    assert ids(select(pool, "least-confident", 3)) == [1, 2, 3]  # all of class a
    # Turns by each class's least confident task: a (0.10), the unpredicted (0.30), b, c.
    assert ids(select(pool, "class-balanced", 7)) == [1, 7, 4, 6, 2, 5, 3]
    assert ids(select(pool, "class-balanced", 3)) == [1, 7, 4]


def test_bad_requests_are_refused() -> None:
    with pytest.raises(SelectionError, match="unknown strategy 'best'"):
        select(POOL, "best", 3)
    with pytest.raises(SelectionError, match="at least 1"):
        select(POOL, "random", 0)


def test_map_disagreement_puts_maps_unlike_any_corrected_one_of_their_class_first() -> None:
    left, right = np.zeros((8, 8)), np.zeros((8, 8))
    left[:, :4], right[:, 4:] = 1.0, 1.0
    # Annotators said: a cat is looked at on the left. Corrected maps come at the target's size,
    # the model's at the image's: they are compared on one grid.
    corrected = [CorrectedMap("cat", np.kron(left, np.ones((2, 2))))]
    pool = [
        Candidate(1, 0.9, "cat", attention=left),  # looks where people said: last
        Candidate(2, 0.9, "cat", attention=right),  # looks elsewhere: first
        Candidate(3, 0.8, "dog", attention=left),  # no dog corrected yet: nothing known, first
        Candidate(4, 0.3, "dog", attention=right),  # ... and the least confident of those
        Candidate(5, 0.1, "cat"),  # no map: not a candidate for a map strategy
    ]
    assert ids(select(pool, "map-disagreement", 5, corrected=corrected)) == [4, 3, 2, 1]
    # With nothing corrected yet, every class is unknown: the least confident first.
    assert ids(select(pool, "map-disagreement", 2)) == [4, 3]
    assert map_disagreement(left, [compared(left)]) == pytest.approx(0.0, abs=1e-6)
    assert map_disagreement(right, [compared(left)]) > 0.3
    with pytest.raises(SelectionError, match="needs the model's maps"):
        select([Candidate(5, 0.1, "cat")], "map-disagreement", 1, corrected=corrected)
