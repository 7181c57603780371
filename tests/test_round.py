"""model/round.py: the split, the scores and the gate at its margins, and a whole tiny round."""

from __future__ import annotations

import pytest
import torch

from model import build_abn
from model.checkpoint import make_meta
from model.round import (
    Examples,
    GateMargins,
    Scores,
    gate,
    is_held_out,
    run_round,
    score,
    split,
)
from model.train import TrainConfig

MARGINS = GateMargins(accuracy=0.25, map_mse=0.125)  # exactly representable in binary


def scores(accuracy: float | None, distance: float) -> Scores:
    return Scores(accuracy=accuracy, map_mse=distance, count=8)


@pytest.mark.parametrize(
    ("after_accuracy", "after_map", "refused"),
    [
        (0.75, 0.25, []),  # no change
        (0.5, 0.25, []),  # lost exactly the accuracy margin
        (0.4375, 0.25, ["accuracy"]),  # lost more
        (0.75, 0.375, []),  # gained exactly the map margin
        (0.75, 0.376, ["distance"]),
        (0.0, 1.0, ["accuracy", "distance"]),
        (None, 0.25, []),  # no known class among the held-out: accuracy cannot judge
    ],
)
def test_gate_at_its_margins(
    after_accuracy: float | None, after_map: float, refused: list[str]
) -> None:
    reasons = gate(scores(0.75, 0.25), scores(after_accuracy, after_map), MARGINS)
    assert len(reasons) == len(refused)
    for reason, word in zip(reasons, refused, strict=True):
        assert word in reason


def test_gate_says_the_numbers() -> None:
    [reason] = gate(scores(1.0, 0.1), scores(0.0, 0.1), MARGINS)
    assert reason == "held-out accuracy fell from 1.000 to 0.000 (margin 0.25)"


def test_split_is_stable_and_never_empty() -> None:
    keys = tuple(range(200))
    train, held = split(keys, 0.2)
    assert set(train) | set(held) == set(range(200)) and not set(train) & set(held)
    assert 20 < len(held) < 60
    assert split(keys, 0.2) == (train, held)
    assert all(is_held_out(keys[i], 0.2) for i in held)
    assert split((5,), 0.2) == ([0], [0])  # one example: train and gate on it
    assert split(keys, 0.0) == (list(range(200)), list(range(200)))


def test_score_counts_only_known_classes() -> None:
    predicted = torch.tensor([0, 1, 2, 1])
    labels = torch.tensor([0, 2, -1, -1])
    maps = torch.zeros(4, 1, 2, 2)
    attention = torch.full((4, 1, 2, 2), 0.5)
    result = score(predicted, attention, labels, maps)
    assert result.accuracy == 0.5 and result.count == 4
    assert result.map_mse == pytest.approx(0.25)
    assert score(predicted, attention, torch.full((4,), -1), maps).accuracy is None


def test_a_tiny_round_trains_and_judges() -> None:
    torch.manual_seed(0)
    model = build_abn("resnet18", 3)
    meta = make_meta("abn", "resnet18", ["a", "b", "c"], image_size=32)
    examples = Examples(
        images=torch.randn(10, 3, 32, 32),
        labels=torch.tensor([0, 1, 2, -1, 0, 1, 2, 0, 1, 2]),
        maps=torch.rand(10, 1, 2, 2),
        keys=tuple(range(100, 110)),
    )
    outcome = run_round(
        model,
        meta,
        examples,
        TrainConfig(epochs=1, batch_size=4, device="cpu"),
        margins=GateMargins(accuracy=1.0, map_mse=1.0),
        holdout_fraction=0.3,
        data_label="ten examples",
    )
    assert sorted(outcome.trained + outcome.held_out) == list(range(10))
    assert outcome.before.count == outcome.after.count == len(outcome.held_out)
    assert outcome.accepted and outcome.meta["settings"]["data"] == "ten examples"
    refused = run_round(
        outcome.model,
        outcome.meta,
        examples,
        TrainConfig(epochs=1, batch_size=4, device="cpu"),
        margins=GateMargins(accuracy=1.0, map_mse=-1.0),  # nothing can pass
    )
    assert not refused.accepted and "distance to human maps" in refused.refusals[0]
    with pytest.raises(ValueError, match="at least one example"):
        run_round(
            model,
            meta,
            Examples(torch.empty(0, 3, 32, 32), torch.empty(0), torch.empty(0, 1, 2, 2), ()),
            TrainConfig(epochs=1, device="cpu"),
        )
