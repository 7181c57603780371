"""model/round_study.py: a tiny simulated study (8 images, 1 round, 1 seed) and what it writes.

Real training and fine-tuning on the CPU, at 32 px, so that it takes seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_dataset
from PIL import Image

from model.round_report import RoundPoint
from model.round_study import (
    GateCall,
    Split,
    StudySettings,
    gate_lines,
    round_examples,
    run_study,
    train_config,
    verdict,
    write_study,
)

SETTINGS = StudySettings(
    strategies=("random", "least-confident"),
    rounds=1,
    size=2,
    seeds=(0,),
    epochs=1,
    finetune_epochs=1,
    image_size=32,
    batch_size=4,
    fraction=0.25,
    device="cpu",
)


def test_a_tiny_study_writes_its_points_report_and_plots(tmp_path: Path) -> None:
    human = np.zeros((32, 32), dtype=np.uint8)
    human[8:24, 8:24] = 255
    data = make_image_dataset(tmp_path / "data", ["a", "b"], human, per_class=4)

    result = run_study(data, tmp_path / "work", SETTINGS)
    out = tmp_path / "report"
    report = write_study(result, SETTINGS, out, "python -m model round-study --rounds 1")

    # 8 TRAIN images less a quarter of each class for validation; the test split is not read.
    assert (result.facts["pool"], result.facts["validation"]) == (6, 2)
    saved = json.loads((out / "points.json").read_text())
    assert saved["settings"]["rounds"] == 1 and saved["settings"]["seeds"] == [0]
    rows = [(p["strategy"], p["round"], p["corrections"]) for p in saved["points"]]
    assert rows == [("random", 0, 0), ("random", 1, 2),
                    ("least-confident", 0, 0), ("least-confident", 1, 2)]  # fmt: skip
    for p in saved["points"]:
        assert 0.0 <= p["accuracy"] <= 1.0 and p["map_mse"] >= 0.0
        assert p["shortcut_accuracy"] is None  # no shortcut dataset: not measured
        assert 0.0 <= p["counterfactual_accuracy"] <= 1.0  # both validation images have maps
    # Each round is put to the gate on either judge: two validation tasks are too few to judge.
    calls = [(c["strategy"], c["round"], c["published_on_tasks"], c["published_on_views"])
             for c in saved["gate_calls"]]  # fmt: skip
    assert calls == [("random", 1, False, False), ("least-confident", 1, False, False)]
    # Round 0 of every strategy is the same first model, measured once per strategy.
    firsts = [p for p in saved["points"] if p["round"] == 0]
    assert firsts[0]["accuracy"] == firsts[1]["accuracy"]
    assert firsts[0]["map_mse"] == pytest.approx(firsts[1]["map_mse"])

    text = report.read_text()
    assert report == out / "report.md"
    assert "Command: `python -m model round-study --rounds 1`" in text
    assert "| random | 1 | 2 | 1 |" in text and "| least-confident | 0 | 0 | 1 |" in text
    assert "On held-out accuracy: random selection's" in text  # the verdict, whichever it is
    assert "misleads" not in text  # no shortcut: judged on accuracy only
    for name in ("accuracy.png", "map_distance.png"):
        assert f"]({name})" in text
        with Image.open(out / name) as plot:
            assert plot.format == "PNG" and plot.width > 100
    assert not (out / "shortcut_accuracy.png").exists()
    assert "](counterfactual_accuracy.png)" in text
    assert "The gate on these rounds" not in text  # nothing to set its verdicts against
    # The first model is kept in the work folder and reused by the next run.
    [checkpoint] = (tmp_path / "work" / "data").glob("abn-32px-1ep-seed0.pt")
    stamp = checkpoint.stat().st_mtime_ns
    again = run_study(data, tmp_path / "work", replace(SETTINGS, strategies=("random",)))
    assert checkpoint.stat().st_mtime_ns == stamp
    assert [p.accuracy for p in again.points if p.round == 0] == [firsts[0]["accuracy"]]


def test_the_first_model_and_the_rounds_share_one_training_configuration() -> None:
    first, round_ = train_config(SETTINGS, 3, SETTINGS.epochs), train_config(SETTINGS, 3, 7)
    assert (first.batch_size, first.image_size, first.seed, first.device) == (4, 32, 3, "cpu")
    assert (round_.epochs, round_.batch_size, round_.device) == (7, 4, "cpu")


def test_an_unknown_strategy_is_refused_before_any_training(tmp_path: Path) -> None:
    bad = StudySettings(strategies=("random", "best"), seeds=(0,))
    with pytest.raises(ValueError, match=r"unknown strategies \['best'\]"):
        run_study(tmp_path / "nowhere", tmp_path / "work", bad)
    with pytest.raises(ValueError, match="replay must be 0 or more images, not -1"):
        run_study(tmp_path / "nowhere", tmp_path / "work", StudySettings(replay=-1))
    with pytest.raises(ValueError, match=r"learning rate must be above 0, not 0\.0"):
        run_study(tmp_path / "nowhere", tmp_path / "work", StudySettings(finetune_lr=0.0))
    with pytest.raises(ValueError, match="guided copies need counterfactual copies"):
        run_study(tmp_path / "nowhere", tmp_path / "work", StudySettings(guided_copies=True))
    assert not (tmp_path / "work").exists()


def test_a_round_learns_from_its_corrections_with_maps_and_replayed_images_by_class_only() -> None:
    maps = torch.rand(10, 1, 4, 4)
    has_map = torch.tensor([True] * 9 + [False])
    pool = Split(torch.zeros(10, 3, 8, 8), torch.arange(10) % 2, maps, has_map)
    index, shown = round_examples(pool, [9, 3, 5], replay=4, seed=7)
    assert index[:3].tolist() == [9, 3, 5]  # the corrections first, each once
    assert shown.tolist() == [False, True, True] + [False] * 4  # 9 has no map to show
    replayed = index[3:].tolist()
    assert len(set(replayed)) == 4 and not set(replayed) & {9, 3, 5}
    assert round_examples(pool, [9, 3, 5], replay=4, seed=7)[0].tolist() == index.tolist()
    assert round_examples(pool, [9, 3, 5], replay=4, seed=8)[0].tolist() != index.tolist()
    # More replay than images left: every other image, still once each.
    everything, _ = round_examples(pool, [9, 3, 5], replay=100, seed=7)
    assert sorted(everything.tolist()) == list(range(10))
    nothing, none_shown = round_examples(pool, [9, 3, 5], replay=0, seed=7)
    assert nothing.tolist() == [9, 3, 5] and none_shown.tolist() == [False, True, True]


def with_cues(data: Path, classes: list[str]) -> Path:
    """Make `data` a shortcut dataset: its cue names the label on TRAIN, the next class on test."""
    cues = {}
    for image in sorted(data.glob("*/*/*.png")):
        split, label = image.parts[-3], image.parts[-2]
        if split in ("train", "test"):
            shift = 1 if split == "test" else 0
            cues[f"{split}/{label}/{image.name}"] = classes[(classes.index(label) + shift) % 2]
    (data / "cues.json").write_text(json.dumps(cues))
    return data


def test_on_a_shortcut_dataset_the_misled_images_are_scored_and_the_objective_reaches_rounds(
    tmp_path: Path,
) -> None:
    human = np.zeros((32, 32), dtype=np.uint8)
    human[8:24, 8:24] = 255
    data = with_cues(
        make_image_dataset(tmp_path / "data", ["a", "b"], human, per_class=4), ["a", "b"]
    )
    settings = replace(SETTINGS, strategies=("random",), rounds=2)
    # Validation is carved from TRAIN, where every cue names the label: nothing misleads there.
    paper = run_study(data, tmp_path / "work", settings)
    assert all(p.shortcut_accuracy is None for p in paper.points)
    # Cues that name another class on TRAIN reach the validation split carved from it.
    cues = json.loads((data / "cues.json").read_text())
    for key in cues:
        if key.startswith("train/"):
            cues[key] = "b" if cues[key] == "a" else "a"
    (data / "cues.json").write_text(json.dumps(cues))
    paper = run_study(data, tmp_path / "work", settings)
    misled = paper.facts["shortcut_images_seed0"]
    assert misled >= 1
    # Every validation image has a class and a map, so each has its view.
    assert paper.facts["views_seed0"] == paper.facts["validation"] >= 2
    assert all(p.shortcut_accuracy is not None for p in paper.points)
    assert all(p.shortcut_accuracy * misled == pytest.approx(round(p.shortcut_accuracy * misled))
               for p in paper.points)  # fmt: skip
    # The round's objective: counterfactual copies, layer3 learning. Same seed, other maps.
    objective = replace(settings, counterfactual_copies=2, learning_stages=1)
    other = run_study(data, tmp_path / "work", objective)
    assert other.points[0].map_mse == pytest.approx(paper.points[0].map_mse)  # one first model
    assert [p.map_mse for p in other.points[1:]] != pytest.approx(
        [p.map_mse for p in paper.points[1:]]
    )
    text = write_study(other, objective, tmp_path / "report", "round-study").read_text()
    assert "On accuracy where the shortcut misleads:" in text
    assert "On accuracy on counterfactual views:" in text
    assert f"({other.facts['views_seed0']:g} views per seed)" in text
    assert "## The gate on these rounds" in text and len(other.gate_calls) == 2
    assert "counterfactual_copies=2, learning_stages=1" in text
    # The backend's opt-in guided objective reaches the rounds; so does a gentler
    # learning rate (a hundredth of the first model's: the maps move less).
    guided = run_study(data, tmp_path / "work", replace(objective, guided_copies=True))
    assert guided.points[0].map_mse == pytest.approx(paper.points[0].map_mse)
    assert [p.map_mse for p in guided.points[1:]] != pytest.approx(
        [p.map_mse for p in other.points[1:]]
    )
    gentle = run_study(data, tmp_path / "work", replace(settings, finetune_lr=1e-4))
    first = paper.points[0].map_mse
    moved = [abs(p.map_mse - first) for p in paper.points[1:]]
    gentler = [abs(p.map_mse - first) for p in gentle.points[1:]]
    assert all(g < m for g, m in zip(gentler, moved, strict=True)), (gentler, moved)
    # Replayed class-only images reach the rounds too.
    replayed = run_study(data, tmp_path / "work", replace(settings, replay=3))
    assert replayed.points[0].map_mse == pytest.approx(paper.points[0].map_mse)
    assert [p.map_mse for p in replayed.points[1:]] != pytest.approx(
        [p.map_mse for p in paper.points[1:]]
    )


def test_a_gain_of_random_below_one_validation_image_per_seed_is_not_judged() -> None:
    settings = replace(SETTINGS, strategies=("random", "misclassified"), seeds=(0, 1))

    def points(random_final: float) -> list[RoundPoint]:
        return [
            RoundPoint(strategy, number, 20 * number, accuracy, 0.1, seed)
            for seed in (0, 1)
            for strategy, finals in (("random", random_final), ("misclassified", 0.99))
            for number, accuracy in ((0, 0.90), (1, finals), (2, finals))
        ]

    facts = {"validation": 200}  # one image is 0.5 points
    noise = "\n".join(verdict(points(0.904), settings, facts))
    assert "moved it by 0.40 points" in noise and "no more than one validation image" in noise
    assert "goal not judged" in noise and "Goal met" not in noise
    one_image = "\n".join(verdict(points(0.905), settings, facts))  # exactly one image per seed
    assert "goal not judged" in one_image
    judged = "\n".join(verdict(points(0.92), settings, facts))
    assert "**Goal met on held-out accuracy** by misclassified." in judged
    # With fewer validation images the same gain is noise.
    assert "goal not judged" in "\n".join(verdict(points(0.92), settings, {"validation": 40}))


def test_the_goal_is_judged_on_the_counterfactual_views_with_their_own_image_count() -> None:
    settings = replace(SETTINGS, strategies=("random", "map-disagreement"), seeds=(0, 1))

    def points(random_final: float, best_at_half: float) -> list[RoundPoint]:
        rows = []
        for seed in (0, 1):
            for strategy, curve in (
                ("random", (0.25, 0.26, random_final)),
                ("map-disagreement", (0.25, best_at_half, best_at_half)),
            ):
                for number, views in enumerate(curve):
                    rows.append(
                        RoundPoint(strategy, number, 20 * number, 0.9, 0.1, seed, None, views)
                    )
        return rows

    facts = {"validation": 200, "views_seed0": 200, "views_seed1": 200}  # one view: 0.5 points
    met = "\n".join(verdict(points(0.30, 0.31), settings, facts))
    assert "On accuracy on counterfactual views: random selection's final mean is 30.00 %" in met
    assert "**Goal met on accuracy on counterfactual views** by map-disagreement." in met
    missed = "\n".join(verdict(points(0.30, 0.29), settings, facts))
    assert "**Goal not met on accuracy on counterfactual views**" in missed
    # Random's 5 points are noise when each seed has only 10 views (10 points a view).
    few = {"validation": 200, "views_seed0": 10, "views_seed1": 10}
    noise = "\n".join(verdict(points(0.30, 0.31), settings, few))
    assert "no more than one validation image per seed (10.00 points)" in noise
    assert "Goal met" not in noise
    # A study without views says nothing of them.
    plain = [replace(p, counterfactual_accuracy=None) for p in points(0.30, 0.31)]
    assert "counterfactual views" not in "\n".join(verdict(plain, settings, facts))


def test_the_gate_table_sets_each_judges_verdicts_against_the_misled_images() -> None:
    def call(tasks: bool, views: bool, before: float, after: float) -> GateCall:
        return GateCall("random", 0, 1, tasks, views, before, after)

    calls = [
        call(False, True, 0.5, 0.8),  # helps: refused on tasks, published on views
        call(False, True, 0.4, 0.6),
        call(True, False, 0.6, 0.6),  # no change does not help
        call(False, False, 0.7, 0.5),
        GateCall("random", 0, 2, True, True, None, None),  # no shortcut measure: left out
    ]
    lines = gate_lines(calls)
    assert "| tasks | 4 | 1 | 0 / 2 | 1 / 1 |" in lines
    assert "| counterfactual views | 4 | 2 | 2 / 0 | 0 / 2 |" in lines
    assert "| 1 | 4 | 2 | 1 | 2 |" in lines  # the last call is of round 2, without a measure
    assert gate_lines(calls[-1:]) == []
    assert any("whichever the verdict" in line for line in lines)
    followed = " ".join(gate_lines(calls, follow_gate="counterfactual"))
    assert "a round refused on the views was dropped" in followed
    assert [c.published_by("tasks") for c in calls[:3]] == [False, False, True]
    assert [c.published_by("counterfactual") for c in calls[:3]] == [True, True, False]


def test_a_study_that_follows_the_gate_drops_each_refused_round(tmp_path: Path) -> None:
    human = np.zeros((32, 32), dtype=np.uint8)
    human[8:24, 8:24] = 255
    data = make_image_dataset(tmp_path / "data", ["a", "b"], human, per_class=4)
    settings = replace(SETTINGS, strategies=("least-confident",), rounds=2)

    chained = run_study(data, tmp_path / "work", settings).points
    followed = run_study(data, tmp_path / "work", replace(settings, follow_gate="tasks"))

    # Two validation tasks are too few for the gate: it refuses both rounds, so the model
    # served after them is the first one, while the corrections still add up.
    assert [c.published_on_tasks for c in followed.gate_calls] == [False, False]
    first = followed.points[0]
    assert [p.corrections for p in followed.points] == [0, 2, 4]
    for p in followed.points[1:]:
        assert (p.accuracy, p.map_mse, p.counterfactual_accuracy) == (
            first.accuracy, first.map_mse, first.counterfactual_accuracy,
        )  # fmt: skip
    # Without following it, the study goes on from each fine-tuned model.
    assert chained[0].map_mse == first.map_mse
    assert chained[2].map_mse != first.map_mse
    with pytest.raises(
        ValueError, match="follow_gate is one of tasks, counterfactual, not 'views'"
    ):
        run_study(data, tmp_path / "work", replace(settings, follow_gate="views"))


def test_the_command_line_passes_the_judge_to_follow_and_refuses_an_unknown_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.cli import main

    human = np.zeros((32, 32), dtype=np.uint8)
    human[8:24, 8:24] = 255
    data = make_image_dataset(tmp_path / "data", ["a", "b"], human, per_class=4)
    tiny = ["round-study", "--data", str(data), "--work-dir", str(tmp_path / "work"),
            "--strategies", "random", "--rounds", "1", "--size", "2", "--seeds", "0",
            "--epochs", "1", "--finetune-epochs", "1", "--image-size", "32",
            "--batch-size", "4", "--fraction", "0.25", "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny, "--out", str(tmp_path / "bad"), "--follow-gate", "views"])
    assert exit_info.value.code == 2 and "invalid choice: 'views'" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()

    main([*tiny, "--out", str(tmp_path / "report"), "--follow-gate", "counterfactual"])
    saved = json.loads((tmp_path / "report" / "points.json").read_text())
    assert saved["settings"]["follow_gate"] == "counterfactual"
    # Two validation tasks are too few for either judge: the round is dropped.
    [before, after] = saved["points"]
    assert after["corrections"] == 2 and after["map_mse"] == before["map_mse"]
    assert "follow_gate=counterfactual" in (tmp_path / "report" / "report.md").read_text()
