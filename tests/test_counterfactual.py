"""model/counterfactual.py: copies that keep the mapped pixels and take the rest elsewhere."""

from __future__ import annotations

import pytest
import torch

from model import build_abn
from model.checkpoint import make_meta
from model.counterfactual import counterfactuals, with_counterfactuals
from model.round import Examples, GateMargins, RoundOutcome, run_round
from model.train import TrainConfig


def test_inside_the_map_is_kept_and_outside_comes_from_another_image() -> None:
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    maps = torch.zeros(4, 1, 2, 2)
    maps[:, :, :, 0] = 1.0  # look at the left half
    has_map = torch.tensor([True, True, False, True])
    out, source = counterfactuals(images, maps, has_map, 3, torch.Generator().manual_seed(0))
    assert out.shape == (9, 3, 8, 8) and source.tolist() == [0, 0, 0, 1, 1, 1, 3, 3, 3]
    for copy, i in zip(out, source.tolist(), strict=True):
        assert torch.all(copy[:, :, :2] == float(i))  # the mapped side, exactly the original
        donor = copy[0, 0, 7].item()  # the far right: wholly the donor's
        assert donor != float(i) and donor in (0.0, 1.0, 2.0, 3.0)
        assert torch.all(copy[:, :, 6:] == donor)  # (bilinear: the middle columns blend)
    again, _ = counterfactuals(images, maps, has_map, 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # same seed, same copies


def test_nothing_to_copy() -> None:
    images = torch.zeros(3, 3, 8, 8)
    maps = torch.ones(3, 1, 2, 2)
    generator = torch.Generator().manual_seed(0)
    assert (
        len(counterfactuals(images, maps, torch.zeros(3, dtype=torch.bool), 2, generator)[0]) == 0
    )
    assert len(counterfactuals(images, maps, torch.ones(3, dtype=torch.bool), 0, generator)[0]) == 0
    assert (
        len(counterfactuals(images[:1], maps[:1], torch.ones(1, dtype=torch.bool), 2, generator)[0])
        == 0
    )


def test_guides_copy_every_image_and_the_human_map_still_cuts_its_own() -> None:
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    maps = torch.zeros(4, 1, 2, 2)
    maps[:, :, :, 0] = 1.0  # the human: look at the left half
    has_map = torch.tensor([True, False, False, False])
    guides = torch.zeros(4, 1, 2, 2)
    guides[:, :, :, 1] = 1.0  # the model: look at the right half
    grown = with_counterfactuals(images, torch.arange(4), maps, has_map, 2, 0, guides)
    assert len(grown) == 4 + 4 * 2  # every image copied, not only the mapped one
    assert grown.labels[4:].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # Only copies of the human-mapped image carry a map for the loss; guides are no target.
    assert grown.has_map[4:].tolist() == [True, True] + [False] * 6
    for copy, i in zip(grown.images[4:], grown.labels[4:].tolist(), strict=True):
        kept = slice(0, 2) if i == 0 else slice(6, 8)  # human map's side, else the guide's
        swapped = slice(6, 8) if i == 0 else slice(0, 2)
        assert torch.all(copy[:, :, kept] == float(i))
        assert not torch.any(copy[:, :, swapped] == float(i))
    plain = with_counterfactuals(images, torch.arange(4), maps, has_map, 2, 0)
    assert len(plain) == 4 + 2  # without guides: the mapped image only


def test_guides_shaped_unlike_the_maps_are_refused() -> None:
    images, maps = torch.zeros(3, 3, 8, 8), torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="guides must be shaped like the maps"):
        with_counterfactuals(
            images, torch.zeros(3, dtype=torch.long), maps, torch.ones(3, dtype=torch.bool),
            2, 0, torch.zeros(3, 1, 4, 4),
        )  # fmt: skip


def test_a_round_trains_on_its_counterfactual_copies() -> None:
    torch.manual_seed(0)
    model = build_abn("resnet18", 2)
    meta = make_meta("abn", "resnet18", ["a", "b"], image_size=32)
    examples = Examples(
        images=torch.randn(12, 3, 32, 32),
        labels=torch.tensor([0, 1] * 6),
        maps=torch.rand(12, 1, 2, 2),
        keys=tuple(range(12)),
    )
    seen: list[int] = []
    outcome = run_round(
        model,
        meta,
        examples,
        TrainConfig(epochs=1, batch_size=64, device="cpu"),
        margins=GateMargins(min_evidence=1),
        holdout_fraction=0.3,
        progress=lambda row: seen.append(row["epoch"]),
        counterfactual_copies=2,
    )
    assert outcome.meta["settings"]["counterfactual_copies"] == 2 and seen == [1]
    assert outcome.before.count == len(outcome.held_out)  # the gate sees no copy


def test_a_guided_round_copies_its_class_only_examples_too() -> None:
    examples = Examples(
        images=torch.randn(12, 3, 32, 32),
        labels=torch.tensor([0, 1] * 6),
        maps=torch.rand(12, 1, 2, 2),
        keys=tuple(range(12)),
        has_map=torch.tensor([True] * 4 + [False] * 8),  # 8 tasks labelled by class only
    )
    meta = make_meta("abn", "resnet18", ["a", "b"], image_size=32)
    config = TrainConfig(epochs=1, batch_size=64, device="cpu")

    rows: dict[bool, list[dict[str, object]]] = {False: [], True: []}

    def round_with(guided: bool) -> RoundOutcome:
        torch.manual_seed(0)
        return run_round(
            build_abn("resnet18", 2), meta, examples, config,
            margins=GateMargins(min_evidence=1), holdout_fraction=0.3,
            counterfactual_copies=2, guided_copies=guided, progress=rows[guided].append,
        )  # fmt: skip

    plain, guided = round_with(False), round_with(True)
    # Progress covers both of a guided round's fine-tunes, each row saying which it is.
    assert [r.get("part") for r in rows[True]] == ["1/2: the copies' guide", "2/2: with the copies"]
    assert [r.get("part") for r in rows[False]] == [None]
    assert plain.trained == guided.trained  # the same split
    mapped = sum(1 for i in plain.trained if i < 4)
    trained = len(plain.trained)
    assert plain.meta["settings"]["examples"] == trained + 2 * mapped
    assert guided.meta["settings"]["examples"] == trained + 2 * trained  # every one copied
    assert guided.meta["settings"]["guided_copies"] and not plain.meta["settings"]["guided_copies"]
    assert guided.before == plain.before  # judged against the same served model
