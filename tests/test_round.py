"""model/round.py: the split, the scores and the gate at its margins, and a whole tiny round."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from squares import CLASSES, square_image

from model import build_abn
from model.checkpoint import make_meta
from model.data import image_transform
from model.first_model import FirstModelConfig, LabelledImages, train_first_model
from model.maps import map_size_for
from model.round import (
    Examples,
    GateMargins,
    Scores,
    counterfactual_views,
    gate,
    is_held_out,
    reference,
    run_round,
    score,
    sign_test,
    split,
)
from model.train import TrainConfig

MARGINS = GateMargins(accuracy=0.25, map_mse=0.125)  # exactly representable in binary


def scores(correct: str, distances: list[float]) -> Scores:
    """Per-task scores: `correct` as "1101" (1: right), distances to the human maps."""
    right = tuple(c == "1" for c in correct)
    return Scores(
        accuracy=sum(right) / len(right) if right else None,
        map_mse=sum(distances) / len(distances) if distances else None,
        count=max(len(right), len(distances)),
        correct=right,
        distances=tuple(distances),
    )


MAPS = [0.25] * 8


@pytest.mark.parametrize(
    ("before", "after", "refused"),
    [
        # More fixed than broken, maps unchanged: a gain.
        (scores("11110000", MAPS), scores("11111000", MAPS), []),
        # Maps closer, classes unchanged: a gain.
        (scores("11110000", MAPS), scores("11110000", [0.2] * 8), []),
        # Nothing changed: no measurable gain (Start Training with nothing new learnt).
        (scores("11110000", MAPS), scores("11110000", MAPS), ["no measurable gain"]),
        # Lost exactly the accuracy margin, not significant (2 broken, 0 fixed: p = 0.25),
        # and maps closer: published.
        (scores("11110000", MAPS), scores("11000000", [0.2] * 8), []),
        # Lost more than the margin.
        (scores("11111111", MAPS), scores("10000001", [0.2] * 8), ["accuracy fell from"]),
        # Within the margin but significant: 5 broken, 0 fixed over 24 tasks (p = 0.031).
        (scores("1" * 20 + "0000", MAPS), scores("1" * 15 + "0" * 9, [0.2] * 8), ["sign test"]),
        # Maps farther beyond the margin (exactly the margin is allowed).
        # (half the tasks farther: 4 of 4 changes, p = 0.0625, not significant).
        (scores("11110000", MAPS), scores("11111000", [0.5] * 4 + [0.25] * 4), []),
        (
            scores("11110000", MAPS),
            scores("11111000", [0.502] * 4 + [0.25] * 4),
            ["distance to human maps"],
        ),
        # Maps farther on most tasks, significantly, within the margin.
        (scores("11110000", MAPS), scores("11111000", [0.3] * 8), ["maps moved away"]),
        # Too few held-out tasks to judge anything.
        (scores("111", [0.25] * 3), scores("111", [0.1] * 3), ["too little held-out evidence"]),
        # Only maps held out (no class known): judged on the maps.
        (scores("", MAPS), scores("", [0.2] * 8), []),
    ],
)
def test_gate(before: Scores, after: Scores, refused: list[str]) -> None:
    reasons = gate(before, after, MARGINS)
    assert len(reasons) == len(refused), reasons
    for reason, words in zip(reasons, refused, strict=True):
        assert words in reason


def test_gate_says_the_numbers() -> None:
    [reason] = gate(scores("1" * 8, MAPS), scores("0" * 8, MAPS), MARGINS)
    assert reason == "held-out accuracy fell from 1.000 to 0.000 (margin 0.25)"
    [reason] = gate(scores("11110000", MAPS), scores("11110000", MAPS), MARGINS)
    assert reason == (
        "no measurable gain on the held-out tasks: 0 fixed, 0 broken, map distance 0.2500 -> 0.2500"
    )


def test_sign_test_is_exact() -> None:
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(1 / 32)
    assert sign_test(3, 1) == pytest.approx(5 / 16)  # P(X >= 3), X ~ Bin(4, 1/2)
    assert sign_test(0, 4) == 1.0


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
    has_map = torch.tensor([True, False] * 10)  # class labels alone beside maps
    examples = Examples(
        images=torch.randn(20, 3, 32, 32),
        labels=torch.tensor([0, 1, 2, -1, 0, 1, 2, 0, 1, 2] * 2),
        maps=torch.rand(20, 1, 2, 2) * has_map[:, None, None, None],
        keys=tuple(range(100, 120)),
        has_map=has_map,
    )
    margins = GateMargins(accuracy=1.0, map_mse=1.0, min_evidence=1)
    outcome = run_round(
        model,
        meta,
        examples,
        TrainConfig(epochs=1, batch_size=4, device="cpu"),
        margins=margins,
        holdout_fraction=0.3,
        data_label="twenty examples",
    )
    assert sorted(outcome.trained + outcome.held_out) == list(range(20))
    held = outcome.held_out
    assert outcome.before.count == outcome.after.count == len(held)
    assert len(outcome.before.distances) == int(has_map[held].sum())  # maps only where given
    assert len(outcome.before.correct) == int((examples.labels[held] >= 0).sum())
    assert outcome.refusals == gate(outcome.before, outcome.after, margins)
    assert outcome.meta["settings"]["data"] == "twenty examples"
    refused = run_round(
        outcome.model,
        outcome.meta,
        examples,
        TrainConfig(epochs=1, batch_size=4, device="cpu"),
        margins=GateMargins(accuracy=1.0, map_mse=-1.0, min_evidence=1),  # nothing can pass
        holdout_fraction=0.3,
    )
    assert not refused.accepted and "distance to human maps" in refused.refusals[0]
    with pytest.raises(ValueError, match="at least one example"):
        run_round(
            model,
            meta,
            Examples(torch.empty(0, 3, 32, 32), torch.empty(0), torch.empty(0, 1, 2, 2), ()),
            TrainConfig(epochs=1, device="cpu"),
        )


def test_a_round_whose_maps_cannot_be_judged_says_what_to_do() -> None:
    [reason] = gate(scores("11110000", []), scores("11110000", []), MARGINS)
    assert "no held-out task has a map yet" in reason and "correct the brush" in reason


def examples_of(labels: list[int], new: list[bool] | None) -> Examples:
    n = len(labels)
    return Examples(
        images=torch.zeros(n, 3, 32, 32),
        labels=torch.tensor(labels),
        maps=torch.zeros(n, 1, 2, 2),
        keys=tuple(range(n)),
        has_map=torch.zeros(n, dtype=torch.bool),
        new=None if new is None else torch.tensor(new),
    )


def test_a_round_is_judged_on_the_held_out_tasks_annotated_before_it() -> None:
    held = [0, 1, 2, 3, 4, 5, 6, 7]
    earlier_five = examples_of([0] * 10, [False] * 5 + [True] * 5)
    assert reference(earlier_five, held, min_evidence=5) == [0, 1, 2, 3, 4]
    # Too few earlier ones to judge on: every held-out task, the round's own included.
    assert reference(earlier_five, held, min_evidence=6) == held
    # Only earlier tasks with a class or a map count as evidence.
    unlabelled = examples_of([-1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [False] * 5 + [True] * 5)
    assert reference(unlabelled, held, min_evidence=5) == held
    assert reference(examples_of([0] * 10, None), held, min_evidence=1) == held
    with pytest.raises(ValueError, match="same length"):
        Examples(
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2),
            torch.zeros(2, 1, 1, 1),
            (1, 2),
            new=torch.tensor([True]),
        )


def test_run_round_scores_only_its_reference() -> None:
    torch.manual_seed(0)
    keys = tuple(range(100, 140))
    new = torch.tensor([k % 2 == 0 for k in keys])
    examples = Examples(
        images=torch.randn(40, 3, 32, 32),
        labels=torch.tensor([k % 3 for k in keys]),
        maps=torch.zeros(40, 1, 2, 2),
        keys=keys,
        has_map=torch.zeros(40, dtype=torch.bool),
        new=new,
    )
    outcome = run_round(
        build_abn("resnet18", 3),
        make_meta("abn", "resnet18", ["a", "b", "c"], image_size=32),
        examples,
        TrainConfig(epochs=1, batch_size=8, device="cpu"),
        margins=GateMargins(accuracy=1.0, map_mse=1.0, min_evidence=2),
        holdout_fraction=0.3,
    )
    earlier = [i for i in outcome.held_out if not new[i]]
    assert len(earlier) >= 2 and len(earlier) < len(outcome.held_out)  # the case under test
    assert outcome.judged_on == earlier
    assert outcome.before.count == outcome.after.count == len(earlier)


def square_examples(keys: list[int], scrambled: set[int], new: set[int] | None) -> Examples:
    """`tests/squares.py` images at 64 px: a class each (the next class where scrambled), the
    square as the map of every key not among the first model's labels (keys < 300)."""
    transform = image_transform(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images, labels, maps = [], [], []
    for key in keys:
        picture, label, human = square_image(key, 64)
        images.append(transform(picture))
        labels.append((label + 1) % len(CLASSES) if key in scrambled else label)
        human_map = torch.from_numpy(human).float()[None, None] / 255
        maps.append(torch.nn.functional.adaptive_avg_pool2d(human_map, map_size_for(64))[0])
    return Examples(
        images=torch.stack(images),
        labels=torch.tensor(labels),
        maps=torch.stack(maps),
        keys=tuple(keys),
        has_map=torch.tensor([k >= 300 for k in keys]),
        new=None if new is None else torch.tensor([k in new for k in keys]),
    )


@pytest.mark.slow
def test_an_honest_round_lifts_accuracy_and_a_scrambled_one_is_refused() -> None:
    """A weak first model, an honest round that lifts it, then a round of 48 scrambled classes
    with honest maps, judged on the labels from before it: refused."""
    first_keys = list(range(200, 236))
    pictures = [square_image(k, 64) for k in first_keys]
    first, meta, _ = train_first_model(
        LabelledImages(
            [p for p, _, _ in pictures], [c for _, c, _ in pictures], first_keys, CLASSES
        ),
        FirstModelConfig(image_size=64, epochs=4, device="cpu"),
    )
    config = TrainConfig(epochs=10, batch_size=16, image_size=64, device="cpu")
    honest_keys = list(range(300, 312))
    honest = run_round(
        first, meta, square_examples(first_keys + honest_keys, set(), set(honest_keys)), config
    )
    assert honest.accepted, honest.refusals
    assert honest.comparison.fixed > honest.comparison.broken
    assert honest.after.accuracy > honest.before.accuracy
    assert all(i < len(first_keys) for i in honest.judged_on)  # the first model's labels

    bad = set(range(400, 448))
    keys = first_keys + honest_keys + sorted(bad)
    scrambled = run_round(honest.model, honest.meta, square_examples(keys, bad, bad), config)
    assert not scrambled.accepted
    assert "held-out accuracy fell" in scrambled.refusals[0]
    assert scrambled.comparison.broken > scrambled.comparison.fixed
    assert not any(keys[i] in bad for i in scrambled.judged_on)


def test_a_round_lets_the_trunks_last_stage_learn_only_when_asked() -> None:
    torch.manual_seed(0)
    meta = make_meta("abn", "resnet18", ["a", "b", "c"], image_size=32)
    examples = examples_of([0, 1, 2] * 6, None)
    examples.images.normal_()
    layer3 = {}
    for stages in (0, 1):
        model = build_abn("resnet18", 3)
        before = [p.detach().clone() for p in model.layer3.parameters()]
        outcome = run_round(
            model,
            meta,
            examples,
            TrainConfig(epochs=1, batch_size=6, device="cpu"),
            margins=GateMargins(accuracy=1.0, map_mse=1.0, min_evidence=1),
            learning_stages=stages,
        )
        after = list(outcome.model.layer3.parameters())
        layer3[stages] = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert outcome.meta["settings"]["learning_stages"] == stages
    assert layer3 == {0: False, 1: True}


def test_a_counterfactual_view_keeps_the_human_map_and_swaps_the_rest() -> None:
    """Each image is one flat value; its map covers the left half. A view must show its own
    value on the left and another example's on the right, for the tasks with a class and a map
    only."""
    n = 6
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    maps = torch.zeros(n, 1, 2, 2)
    maps[..., 0] = 1.0  # the left column of the map: the left half of the image
    examples = Examples(
        images=images,
        labels=torch.tensor([0, 1, -1, 0, 1, 0]),  # example 2 has no class
        maps=maps,
        keys=tuple(range(n)),
        has_map=torch.tensor([True, True, True, False, True, True]),  # example 3 has no map
    )
    views, shown = counterfactual_views(examples, [0, 1, 2, 3, 4, 5], seed=3)
    assert shown == [0, 1, 4, 5]
    for view, source in zip(views, shown, strict=True):
        assert torch.all(view[:, :, 0] == source)  # the far left: all its own
        donor = float(view[0, 0, -1])  # the far right: all another's
        assert donor != source and donor in (0.0, 1.0, 4.0, 5.0)
    again, _ = counterfactual_views(examples, [0, 1, 2, 3, 4, 5], seed=3)
    assert torch.equal(views, again)  # the same views before and after a round
    none, nobody = counterfactual_views(examples, [0, 2, 3], seed=3)  # a single usable task
    assert nobody == [] and len(none) == 0


def test_the_gate_judges_counterfactual_views_only_when_told() -> None:
    with pytest.raises(ValueError, match="tasks, counterfactual"):
        GateMargins(on="views")
    torch.manual_seed(0)
    n = 24
    examples = Examples(
        images=torch.randn(n, 3, 32, 32),
        labels=torch.tensor([i % 3 for i in range(n)]),
        maps=torch.rand(n, 1, 2, 2),
        keys=tuple(range(500, 500 + n)),
    )
    config = TrainConfig(epochs=1, batch_size=8, device="cpu")
    meta = make_meta("abn", "resnet18", ["a", "b", "c"], image_size=32)
    margins = GateMargins(accuracy=1.0, map_mse=-1.0, min_evidence=1)  # nothing passes
    for on in ("tasks", "counterfactual"):
        outcome = run_round(
            build_abn("resnet18", 3), meta, examples, config,
            margins=dataclasses.replace(margins, on=on), holdout_fraction=0.4,
        )  # fmt: skip
        assert outcome.views_before is not None and outcome.views_after is not None
        assert outcome.views_before.count == len(outcome.judged_on)  # each has class and map
        on_views = gate(outcome.views_before, outcome.views_after, margins)
        on_tasks = gate(outcome.before, outcome.after, margins)
        expected = (
            [f"on the held-out tasks' counterfactual views, {r}" for r in on_views]
            if on == "counterfactual"
            else on_tasks
        )
        assert outcome.refusals == expected and outcome.refusals
