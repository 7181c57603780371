"""model/first_model.py: a project's first ABN, from labelled images only."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.first_model import (
    FirstModelConfig,
    FirstModelError,
    LabelledImages,
    first_model_split,
    train_first_model,
)
from model.round import split

CLASSES = ["red", "blue"]


def coloured(n: int) -> LabelledImages:
    """`n` images per class: red ones and blue ones, an easy problem."""
    images, labels = [], []
    for i in range(n):
        images.append(Image.new("RGB", (40, 30), (200 + i, 10, 10)))
        labels.append(0)
        images.append(Image.new("RGB", (30, 40), (10, 10, 200 + i)))
        labels.append(1)
    return LabelledImages(images, labels, keys=list(range(2 * n)), classes=CLASSES)


def test_a_first_model_learns_the_classes_in_config_order() -> None:
    config = FirstModelConfig(image_size=32, epochs=4, batch_size=8, device="cpu", lr=0.05)
    rows = []
    model, meta, report = train_first_model(coloured(10), config, progress=rows.append)
    assert meta.classes == CLASSES and meta.kind == "abn" and meta.image_size == 32
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and report.stopped_by == "epochs"
    assert report.trained_on + report.validated_on + report.held_out == 20
    assert report.validated_on > 0 and report.held_out > 0
    assert report.class_counts == {"red": 10, "blue": 10}
    assert 1 <= report.best_epoch <= 4
    best = max(r["val_acc"] for r in rows)
    assert report.validation_accuracy == best == meta["metrics"]["validation_top1"]
    assert not model.training
    out = model(torch.zeros(1, 3, 32, 32))
    assert out.perception_logits.shape == (1, 2) and out.attention.shape == (1, 1, 2, 2)


def test_the_time_budget_stops_training_after_an_epoch() -> None:
    config = FirstModelConfig(image_size=32, epochs=50, time_budget_s=1e-9, device="cpu")
    _, _, report = train_first_model(coloured(3), config)
    assert (report.epochs_run, report.stopped_by) == (1, "time budget")


def test_too_few_to_split_trains_on_everything_without_validation() -> None:
    config = FirstModelConfig(image_size=32, epochs=1, device="cpu", validation_fraction=0.0)
    _, _, report = train_first_model(coloured(2), config)
    assert (report.trained_on, report.validated_on, report.validation_accuracy) == (4, 0, None)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (LabelledImages([], [], [], ["cat"]), "at least two classes"),
        (
            LabelledImages([Image.new("RGB", (8, 8))] * 3, [0, 0, 0], [1, 2, 3], ["cat", "dog"]),
            "fewer than two classes (cat: 3); label some tasks of another class (dog)",
        ),
        (LabelledImages([], [], [], ["cat", "dog"]), "no labelled tasks"),
    ],
)
def test_what_cannot_make_a_classifier_is_refused(data: LabelledImages, needle: str) -> None:
    with pytest.raises(FirstModelError) as caught:
        train_first_model(data, FirstModelConfig(image_size=32, epochs=1, device="cpu"))
    assert needle in str(caught.value)


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="same length"):
        LabelledImages([Image.new("RGB", (8, 8))], [0, 1], [1], CLASSES)


def test_a_first_model_starts_from_a_local_pretrained_file(tmp_path) -> None:
    """ABN_PRETRAINED as a file (users with the internet name torchvision weights instead)."""
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    config = FirstModelConfig(image_size=32, epochs=1, device="cpu", pretrained=str(weights))
    model, meta, _ = train_first_model(coloured(3), config)
    assert meta["settings"]["pretrained"] == str(weights) and meta["settings"]["lr"] == 0.01
    source = torch.load(weights, weights_only=True)
    # The trunk came from the file (training moves it, but not far from the start in one
    # epoch at this learning rate); a fresh init would be unrelated.
    start = source["layer1.0.conv1.weight"]
    trained = model.state_dict()["layer1.0.conv1.weight"]
    assert torch.corrcoef(torch.stack([start.flatten(), trained.flatten()]))[0, 1] > 0.9


def test_the_first_model_never_sees_the_tasks_its_rounds_are_judged_on() -> None:
    keys = tuple(range(1000, 1100))
    train, val, held = first_model_split(keys, 0.2)
    assert held == split(keys, 0.2)[1]  # exactly what a round's gate holds out
    assert not set(train) & set(val) and not (set(train) | set(val)) & set(held)
    assert sorted(train + val + held) == list(range(100)) and len(val) > 5
    assert first_model_split(keys, 0.2) == (train, val, held)  # stable
    assert first_model_split(keys[:1], 0.2) == ([0], [], [])  # too few: train on it
