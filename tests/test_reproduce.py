"""`abn reproduce` (model.paper.reproduce): sample selection, the fine-tuning set, the protocol.

Tiny on purpose: 32 px random images, 3 classes, one epoch; what is checked is the protocol's
wiring (which samples get maps, what is written), not what the networks learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_dataset
from PIL import Image

from model import build_abn, load_checkpoint
from model.checkpoint import make_meta
from model.cli import main
from model.data import DatasetError, list_samples
from model.paper.reproduce import fill_defaults, finetune_dataset, select_samples
from model.paper.shortcut import CUES_FILE, breakdown_lines, conflicting, has_cues
from model.paper.sweep import carve_validation, render

CLASSES = ["ant", "bee", "cat"]
SIZE = 32


def make_dataset(root: Path, per_class: int = 3, maps: bool = True) -> Path:
    """Random images; the human map is a centred square for every image."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    return make_image_dataset(root, CLASSES, mask if maps else None, per_class, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("repro") / "tiny")


@pytest.fixture(scope="module")
def abn() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    return build_abn("resnet18", len(CLASSES)).eval(), make_meta("abn", "resnet18", CLASSES, SIZE)


def fake_confidence(probs: list[float], correct: list[bool]):
    def score(*_args: object) -> tuple[np.ndarray, np.ndarray]:
        return np.array(probs), np.array(correct)

    return score


def test_misclassified_lowest_confidence_first_within_budget(
    data: Path, abn: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    probs = [0.9, 0.2, 0.5, 0.1, 0.8, 0.3, 0.7, 0.6, 0.4]
    correct = [True, False, False, True, False, True, True, False, True]
    monkeypatch.setattr(
        "model.paper.reproduce.true_class_confidence", fake_confidence(probs, correct)
    )
    chosen = select_samples(*abn, data, "misclassified", budget=3)
    names = [f"{s.image.parent.name}/{s.image.stem}" for s in chosen.samples]
    # misclassified: 1 (0.2), 2 (0.5), 4 (0.8), 7 (0.6); lowest first, 3 of them
    assert names == ["ant/1", "ant/2", "cat/1"]
    assert (chosen.candidates, chosen.misclassified, chosen.total) == (4, 4, 9)
    assert chosen.rule == "misclassified"

    by_confidence = select_samples(*abn, data, "confidence", budget=4)
    order = [f"{s.image.parent.name}/{s.image.stem}" for s in by_confidence.samples]
    assert order == ["bee/0", "ant/1", "bee/2", "cat/2"]  # 0.1, 0.2, 0.3, 0.4


def test_no_misclassified_falls_back_to_confidence(
    data: Path, abn: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    probs = [0.9, 0.95, 0.5, 0.99, 0.8, 0.85, 0.7, 0.6, 0.75]
    monkeypatch.setattr(
        "model.paper.reproduce.true_class_confidence", fake_confidence(probs, [True] * 9)
    )
    chosen = select_samples(*abn, data, "misclassified", budget=2)
    assert chosen.rule.startswith("confidence")
    assert [f"{s.image.parent.name}/{s.image.stem}" for s in chosen.samples] == ["ant/2", "cat/1"]


def test_finetune_set_has_maps_only_on_selected(data: Path, abn: tuple) -> None:
    chosen = select_samples(*abn, data, "confidence", budget=2)
    dataset = finetune_dataset(data, abn[1], chosen.samples)
    assert len(dataset) == 9
    flagged = [s.image for s in dataset.samples if s.map is not None]
    assert sorted(flagged) == sorted(s.image for s in chosen.samples)
    has_map = [bool(dataset[i][3]) for i in range(len(dataset))]
    assert sum(has_map) == 2


def test_selection_needs_training_maps(tmp_path: Path, abn: tuple) -> None:
    data = make_dataset(tmp_path / "nomaps", per_class=1, maps=False)
    with pytest.raises(DatasetError, match=r"no human maps under .*maps/train"):
        select_samples(*abn, data, "misclassified", budget=None)


def test_builtin_dataset_gets_cpu_defaults() -> None:
    given = {"image_size": None, "epochs": 3, "finetune_epochs": None, "step": None}
    filled = fill_defaults("decoy-digits", given)
    assert given["epochs"] == 3 and "epochs" not in filled
    assert given["image_size"] == 64 and given["step"] == 8 * 64
    other = {"image_size": None, "epochs": None, "finetune_epochs": None, "step": None}
    fill_defaults("/some/dir", other)
    assert other["image_size"] == 224 and other["step"] is None


def test_reproduce_end_to_end(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    main(
        [
            "reproduce",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--image-size",
            str(SIZE),
            "--batch-size",
            "3",  # 9 training images: no batch of one (BatchNorm on a 1x1 map needs two)
            "--budget",
            "2",
            "--selection",
            "confidence",
            "--step",
            str(8 * SIZE),
            "--gamma",
            "2.5",
            "--control",
            "--device",
            "cpu",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["resnet", "cam", "gradcam", "abn", "proposed"]
    assert set(metrics["methods"]["proposed"]) == {
        "top1",
        "top5",
        "deletion",
        "insertion",
        "map_mse",
    }
    report = (out / "report.md").read_text()
    assert "Proposed (ResNet18+ABN)" in report and "## The paper's claims on this run" in report
    assert "Samples corrected: 2 of 9 training images (rule: confidence, budget 2" in report
    assert "gamma = 2.5" in report
    assert "| Control: same fine-tuning, gamma = 0 |" in report
    for role in ("resnet", "abn", "proposed", "control"):
        _, meta = load_checkpoint(out / "checkpoints" / f"{role}.pt")
        assert meta["kind"] == ("resnet" if role == "resnet" else "abn")
    _, tuned = load_checkpoint(out / "checkpoints" / "proposed.pt")
    assert tuned["settings"]["gamma"] == 2.5 and tuned["settings"]["selection"]["selected"] == 2
    assert (out / "figures" / "examples.png").is_file() and (
        out / "figures" / "curves.png"
    ).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_validation_is_carved_from_train_only(data: Path, tmp_path: Path) -> None:
    carved = carve_validation(data, tmp_path / "carved", fraction=1 / 3, seed=0)
    train = list_samples(carved, "train", CLASSES)
    val = list_samples(carved, "test", CLASSES)
    assert (len(train), len(val)) == (6, 3)  # stratified: one of three per class held out
    assert sorted(s.label for s in val) == [0, 1, 2]
    sources = [s.image.resolve() for s in train + val]
    assert len(set(sources)) == 9 and all(p.parent.parent.name == "train" for p in sources)
    assert all(s.map is not None and "maps/train" in str(s.map.resolve()) for s in train + val)
    rows = [
        {
            "setting": "ABN as trained",
            "selected": 0,
            "top1": 0.5,
            "deletion": 0.2,
            "insertion": 0.6,
            "map_mse": 0.2,
        },
        {
            "setting": "gamma 1",
            "selected": 2,
            "top1": 0.75,
            "deletion": 0.1,
            "insertion": 0.7,
            "map_mse": 0.1,
        },
    ]
    table = render(rows, {"train": 6, "val": 3}, "abn sweep ...")
    assert "| gamma 1 | 2 | **75.00** | 0.1000 | 0.7000 | 0.1000 |" in table


def test_cue_flags_come_from_the_cues_file_through_a_carved_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cues = {}
    for i, (label, cue) in enumerate([(3, "3"), (3, "7"), (5, "5")]):
        name = f"train/{label}/{i}.png"
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(data / name)
        cues[name] = cue
    (data / CUES_FILE).write_text(json.dumps(cues))
    classes = [str(d) for d in range(10)]
    samples = list_samples(data, "train", classes)
    flags = conflicting(samples, classes)
    assert flags.tolist() == [False, True, False]
    assert has_cues(samples)
    # A carved split is symlinks: the flags follow them back to the dataset's cues file.
    carved = carve_validation(data, tmp_path / "carved", 0.0, seed=0)
    assert conflicting(list_samples(carved, "train", classes), classes).tolist() == flags.tolist()
    table = breakdown_lines({"ABN": np.array([True, False, True])}, flags)
    assert table[-1] == "| ABN | 0.00 (1) | 100.00 (2) |"


def test_a_dataset_without_cues_has_no_cue_flags(tmp_path: Path) -> None:
    data = make_image_dataset(tmp_path / "plain", ["a", "b"], None, per_class=1)
    assert not has_cues(list_samples(data, "train", ["a", "b"]))
