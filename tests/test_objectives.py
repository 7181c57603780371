"""The fine-tuning objectives beyond the paper's, the shortcut datasets, and their study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata

from model import build_abn
from model.abn import ABNOutput
from model.checkpoint import make_meta
from model.cli import main
from model.data import InMemoryMapsDataset, list_samples
from model.losses import dont_look_loss
from model.paper.decoy_digits import build_decoy_digits
from model.paper.objectives import OBJECTIVES, counterfactual_dataset, follows, pooled_mcnemar
from model.paper.shortcut import conflicting
from model.paper.texture_shapes import (
    CLASSES,
    TEXTURES,
    CueConflicts,
    build_background_shapes,
    build_texture_shapes,
    cue_conflicts,
    render,
)
from model.train import TrainConfig, finetune, freeze_trunk


def test_dont_look_penalises_gradients_outside_the_map_only() -> None:
    grads = torch.ones(2, 3, 4, 4)
    human = torch.zeros(2, 1, 4, 4)
    human[:, :, :2] = 1.0  # the top half is where to look
    has_map = torch.tensor([True, False])
    # 3 channels x 8 cells outside the map, gradient 1 each; the unmapped sample adds nothing.
    assert float(dont_look_loss(grads, human, has_map)) == pytest.approx(24.0)
    inside_only = grads * human
    assert float(dont_look_loss(inside_only, human, has_map)) == 0.0
    assert float(dont_look_loss(grads, human, torch.tensor([False, False]))) == 0.0


def test_learning_stages_unfreeze_the_trunks_last_stages_only() -> None:
    model = build_abn("resnet18", 3)
    branches = sum(p.numel() for b in model.branches() for p in b.parameters())
    assert sum(p.numel() for p in freeze_trunk(model, 0)) == branches
    learning = freeze_trunk(model, 1)
    assert sum(p.numel() for p in learning) == branches + sum(
        p.numel() for p in model.layer3.parameters()
    )
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert not any(p.requires_grad for p in model.layer2.parameters())
    with pytest.raises(ValueError, match="learning_stages"):
        freeze_trunk(model, 4)


def tiny_set(n: int = 8, size: int = 32) -> InMemoryMapsDataset:
    gen = torch.Generator().manual_seed(0)
    maps = torch.zeros(n, 1, 2, 2)
    maps[:, :, 0, 0] = 1.0
    return InMemoryMapsDataset(
        torch.randn(n, 3, size, size, generator=gen),
        torch.arange(n) % 3,
        maps,
        torch.ones(n, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    ("dont_look", "stages"), [(1.0, 0), (0.0, 1), (1.0, 1)], ids=["dont-look", "layer3", "both"]
)
def test_finetune_with_each_objective_moves_what_it_should(dont_look: float, stages: int) -> None:
    model = build_abn("resnet18", 3)
    meta = make_meta("abn", "resnet18", ["a", "b", "c"], 32)
    layer2 = [p.detach().clone() for p in model.layer2.parameters()]
    layer3 = [p.detach().clone() for p in model.layer3.parameters()]
    config = TrainConfig(epochs=1, batch_size=4, image_size=32, device="cpu")
    tuned, new_meta = finetune(
        model, meta, config=config, dataset=tiny_set(), dont_look=dont_look, learning_stages=stages
    )
    assert new_meta["settings"]["dont_look"] == dont_look
    assert new_meta["settings"]["learning_stages"] == stages
    moved = any(
        not torch.equal(a, b) for a, b in zip(layer3, tuned.layer3.parameters(), strict=True)
    )
    assert moved == (stages > 0)
    assert all(torch.equal(a, b) for a, b in zip(layer2, tuned.layer2.parameters(), strict=True))


def test_counterfactual_copies_join_the_fine_tuning_set() -> None:
    base = tiny_set(6)
    base.has_map[3:] = False
    grown = counterfactual_dataset(base, copies=2, seed=0)
    assert len(grown) == 6 + 3 * 2
    assert grown.labels[6:].tolist() == [0, 0, 1, 1, 2, 2]


def test_a_guide_model_copies_every_image_by_its_own_map() -> None:
    base = tiny_set(6)
    base.has_map[3:] = False
    guide = build_abn("resnet18", 3).eval()
    grown = counterfactual_dataset(base, copies=2, seed=0, guide=guide)
    assert len(grown) == 6 + 6 * 2
    assert grown.has_map[6:].tolist() == [True] * 6 + [False] * 6
    assert grown.labels[6:].tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]


def test_texture_shapes_is_deterministic_and_records_its_cues(tmp_path: Path) -> None:
    data = build_texture_shapes(tmp_path / "a")
    again = build_texture_shapes(tmp_path / "b")
    for name in ("train/disc/0000.png", "test/cross/0149.png", "cues.json"):
        assert (data / name).read_bytes() == (again / name).read_bytes()
    classes = sorted(CLASSES)
    train = conflicting(list_samples(data, "train", classes), classes)
    test = conflicting(list_samples(data, "test", classes), classes)
    # TRAIN: the texture names the class 90% of the time (plus chance on the rest); test: random.
    assert 0.03 < train.mean() < 0.12
    assert 0.65 < test.mean() < 0.85
    free = build_texture_shapes(tmp_path / "free", correlation=0.0)
    assert 0.65 < conflicting(list_samples(free, "train", classes), classes).mean() < 0.85
    assert list_samples(data, "train", classes)[0].map is not None


def test_background_shapes_keeps_the_class_texture_out_of_the_human_map(tmp_path: Path) -> None:
    textures = [np.asarray(getattr(skdata, name)(), dtype=np.uint8) for name in TEXTURES[:2]]
    drawn = [render("disc", t, np.random.default_rng(5), plain_inside=True) for t in textures]
    (first, region), (second, same_region) = drawn
    inside = np.asarray(region) > 0
    assert np.array_equal(inside, np.asarray(same_region) > 0) and 0 < inside.mean() < 0.5
    a, b = np.asarray(first), np.asarray(second)
    # Inside the map the picture is the same whichever the texture; outside it is the texture.
    assert np.array_equal(a[inside], b[inside])
    assert np.abs(a[~inside].astype(int) - b[~inside]).mean() > 10
    textured, _ = render("disc", textures[0], np.random.default_rng(5))
    assert not np.array_equal(np.asarray(textured)[inside], a[inside])

    data = build_background_shapes(tmp_path / "bg")
    again = build_background_shapes(tmp_path / "bg-again")
    assert (data / "train/disc/0000.png").read_bytes() == (
        again / "train/disc/0000.png"
    ).read_bytes()
    assert json.loads((data / "dataset.json").read_text())["name"] == "background-shapes"
    classes = sorted(CLASSES)
    assert 0.03 < conflicting(list_samples(data, "train", classes), classes).mean() < 0.12
    assert 0.65 < conflicting(list_samples(data, "test", classes), classes).mean() < 0.85


def test_cue_conflict_pictures_set_shape_and_both_textures_against_each_other() -> None:
    conflicts = cue_conflicts(60, seed=3)
    assert conflicts.pictures.shape == (60, 64, 64, 3) and conflicts.pictures.dtype == np.uint8
    for cues in zip(conflicts.shape, conflicts.inside, conflicts.outside, strict=True):
        assert len(set(cues)) == 3 and set(cues) <= set(CLASSES)
    assert len(set(conflicts.shape)) == len(CLASSES)  # every class gets its turn
    again = cue_conflicts(60, seed=3)
    assert np.array_equal(again.pictures, conflicts.pictures) and again.inside == conflicts.inside
    assert not np.array_equal(cue_conflicts(60, seed=4).pictures, conflicts.pictures)


class FollowsTheClassItIsTold(torch.nn.Module):
    """Stands in for an ABN: predicts the class named in the picture's top-left pixel."""

    def forward(self, images: torch.Tensor) -> ABNOutput:
        logits = torch.nn.functional.one_hot(
            (images[:, 0, 0, 0] > 0).long(), num_classes=len(CLASSES)
        ).float()
        attention = torch.zeros(len(images), 1, 4, 4)
        return ABNOutput(logits, logits, attention)


def test_follows_counts_the_predictions_naming_each_cue() -> None:
    pictures = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    pictures[:3, 0, 0] = 255  # the stand-in predicts classes[1] for these, classes[0] for the last
    classes = sorted(CLASSES)
    conflicts = CueConflicts(
        pictures,
        shape=(classes[1], classes[1], classes[2], classes[0]),
        inside=(classes[2], classes[0], classes[1], classes[3]),
        outside=(classes[0], classes[2], classes[0], classes[1]),
    )
    meta = make_meta("abn", "resnet18", classes, image_size=64)
    shares = follows(FollowsTheClassItIsTold(), meta, conflicts, torch.device("cpu"))
    assert (shares.shape, shares.inside, shares.outside) == (0.75, 0.25, 0.0)


def test_decoy_digits_records_the_patch_colour_as_its_cue(tmp_path: Path) -> None:
    data = build_decoy_digits(tmp_path / "d")
    cues = json.loads((data / "cues.json").read_text())
    classes = [str(d) for d in range(10)]
    assert len(cues) == len(list_samples(data, "train", classes)) + len(
        list_samples(data, "test", classes)
    )
    assert conflicting(list_samples(data, "train", classes), classes).mean() < 0.15


def test_objective_needs_a_builtin_shortcut_dataset(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="built-in shortcut dataset"):
        main(
            [
                "reproduce",
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--objective",
                "counterfactual",
                "--epochs",
                "1",
                "--image-size",
                "32",
            ]
        )


@pytest.mark.slow
def test_reproduce_objective_writes_every_model_and_the_paired_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "reproduce", "--data", "texture-shapes", "--out", "results",
            "--objective", "counterfactual", "--objective", "dont-look",
            "--objective", "counterfactual-propagated",
            "--seeds", "0,1", "--epochs", "1", "--finetune-epochs", "1",
            "--image-size", "32", "--device", "cpu",
        ]
    )  # fmt: skip
    report = (tmp_path / "results" / "report.md").read_text()
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    objectives = {"proposed", "control", "counterfactual", "dont-look", "counterfactual-propagated"}
    assert set(metrics["models"]) == {"abn", "bound", *objectives}
    assert len(metrics["models"]["counterfactual"]["test_top1"]) == 2
    assert metrics["chosen_on_validation"] in objectives
    assert "counterfactual-propagated vs proposed" in report
    assert "counterfactual vs proposed" in report and "dont-look vs control" in report
    assert "proposed vs control" in report and "control vs proposed" not in report
    assert "bound: ABN without the shortcut" in report
    # texture-shapes draws cue-conflict pictures: every model's shares are reported.
    assert "## Which cue each model follows (cue-conflict pictures)" in report
    follows_shape = metrics["models"]["counterfactual-propagated"]["follows_shape"]
    assert len(follows_shape) == 2 and all(0.0 <= f <= 1.0 for f in follows_shape)
    for model in metrics["models"].values():
        for seed in range(2):  # shares of three disjoint cues: at most all predictions
            assert sum(model[f"follows_{c}"][seed] for c in ("shape", "inside", "outside")) <= 1
    assert not (tmp_path / "results" / "work").exists()  # the carved splits stay under runs/
    assert (tmp_path / "runs" / "objectives" / "texture-shapes" / "seed1" / "carved").is_dir()


def test_pooled_mcnemar_counts_discordant_images_over_seeds() -> None:
    from model.paper.objectives import Scores, SeedRun

    def run(a: list[bool], b: list[bool]) -> SeedRun:
        r = SeedRun(seed=0, corrected=1, train_images=4)
        flags = np.zeros(len(a), dtype=bool)
        r.test = {"a": Scores(np.array(a), flags), "b": Scores(np.array(b), flags)}
        return r

    runs = [run([True, False, True], [True, True, True]), run([False, True], [True, True])]
    only_a, only_b, p = pooled_mcnemar(runs, "a", "b")
    assert (only_a, only_b) == (0, 2)
    assert p == pytest.approx(0.5)
    assert set(OBJECTIVES) >= {"proposed", "control", "counterfactual", "dont-look"}
