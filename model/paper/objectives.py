"""Which fine-tuning objective makes corrections change decisions on a shortcut (`--objective`).

On a shortcut dataset (a cue that names the class in TRAIN, random in test) the question is not
only whether the maps move but whether the classifier stops using the cue. Per seed this:

1. carves a validation split (20%) from TRAIN and trains the ABN on the rest;
2. trains the same ABN on the shortcut-free twin (the cue random in TRAIN too): the upper bound;
3. corrects at most 10% of the training images, the misclassified ones first, then the least
   confident (their human maps stand in for the annotator's);
4. fine-tunes one copy of the ABN per objective, the gamma-0 control among them;
5. scores every model on the validation split (where the choice of a default is made: accuracy on
   the validation images whose cue names another class, the in-TRAIN stand-in for the test
   split) and on the test split (reported, never used to choose);
6. where the dataset makes cue-conflict pictures (``texture-shapes``), says which cue each model
   follows: the shape, the texture inside the human map, or the texture outside it. Reported,
   never used to choose.

Paired tests compare objectives on the same test images, pooled over seeds (exact McNemar).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.stats import binomtest
from torch.utils.data import DataLoader

from model.abn import ABN
from model.checkpoint import CheckpointMeta
from model.counterfactual import with_counterfactuals
from model.data import AttentionDataset, InMemoryMapsDataset, image_transform
from model.metrics import map_mse
from model.paper.reproduce import finetune_dataset, select_samples
from model.paper.shortcut import conflicting
from model.paper.sweep import carve_validation
from model.paper.texture_shapes import CueConflicts
from model.round import predict_all
from model.train import DEFAULT_GAMMA, TrainConfig, finetune, train

log = logging.getLogger(__name__)

CORRECTED_FRACTION = 0.10  # at most this share of the training images is corrected
VALIDATION_FRACTION = 0.2
CONFLICT_PICTURES = 800  # per seed, where the dataset has cue-conflict pictures


@dataclass(frozen=True)
class Objective:
    """One way to fine-tune on corrected maps (the settings of :func:`model.train.finetune`)."""

    name: str
    summary: str
    gamma: float = DEFAULT_GAMMA
    counterfactual_copies: int = 0
    dont_look: float = 0.0
    learning_stages: int = 0
    # Copy every training image, cut by the maps a first fine-tune (the paper's) has learnt
    # from the corrected ones (model/counterfactual.py's `guides`); the round starts from it.
    propagate: bool = False


OBJECTIVES = {
    o.name: o
    for o in (
        Objective("proposed", "the paper's: L_att + L_per + gamma ||M' - M||_2, branches learn"),
        Objective("control", "gamma 0: the same fine-tuning without any map", gamma=0.0),
        Objective(
            "counterfactual",
            "proposed + 4 copies of each corrected image with the outside of its map swapped",
            counterfactual_copies=4,
        ),
        Objective(
            "dont-look",
            "proposed + a penalty on the decision's feature gradients outside the map",
            dont_look=1.0,
        ),
        Objective(
            "counterfactual-layer3",
            "counterfactual, and the trunk's last stage (layer3) learns too",
            counterfactual_copies=4,
            learning_stages=1,
        ),
        Objective(
            "counterfactual-propagated",
            "proposed first; then 2 counterfactual copies of every training image, cut by the "
            "human map or else by the proposed model's own map, layer3 learning",
            counterfactual_copies=2,
            learning_stages=1,
            propagate=True,
        ),
    )
}


@dataclass
class Scores:
    """One model on one split: per image, whether it is right, and the cue flags."""

    correct: np.ndarray
    conflicting: np.ndarray
    map_mse: float | None = None

    def top1(self, subset: str = "all") -> float:
        mask = {
            "all": np.ones_like(self.correct),
            "conflicting": self.conflicting,
            "agreeing": ~self.conflicting,
        }[subset]
        return float(self.correct[mask].mean()) if mask.any() else float("nan")


@dataclass(frozen=True)
class Follows:
    """On cue-conflict pictures: the share of predictions naming each cue's class."""

    shape: float
    inside: float
    outside: float


@dataclass
class SeedRun:
    """Every model of one seed, scored on validation and test (and cue-conflict pictures)."""

    seed: int
    corrected: int
    train_images: int
    val: dict[str, Scores] = field(default_factory=dict)
    test: dict[str, Scores] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    follows: dict[str, Follows] = field(default_factory=dict)


@torch.no_grad()
def score(
    model: ABN, meta: CheckpointMeta, data_dir: Path, split: str, device: torch.device
) -> Scores:
    """Top-1 per image, the cue flags, and the mean map MSE against the human maps."""
    dataset = AttentionDataset(data_dir, split, meta.classes, meta.image_size, meta.mean, meta.std)
    model.to(device).eval()
    right, errors = [], []
    for images, labels, maps, has_map in DataLoader(dataset, batch_size=128):
        out = model(images.to(device))
        right.append((out.perception_logits.argmax(1).cpu() == labels).numpy())
        if has_map.any():
            errors.append(map_mse(out.attention.float().cpu()[has_map], maps[has_map]))
    mse = float(torch.cat(errors).mean()) if errors else None
    return Scores(np.concatenate(right), conflicting(dataset.samples, meta.classes), mse)


@torch.no_grad()
def follows(
    model: ABN, meta: CheckpointMeta, conflicts: CueConflicts, device: torch.device
) -> Follows:
    """Which cue `model` follows on pictures whose cues name different classes."""
    prepare = image_transform(meta.image_size, meta.mean, meta.std)
    images = torch.stack([prepare(Image.fromarray(p)) for p in conflicts.pictures])
    predicted, _ = predict_all(model.to(device), images, device, 256)
    named = np.array([meta.classes[int(k)] for k in predicted])

    def share(cue: tuple[str, ...]) -> float:
        return float(np.mean(named == np.array(cue)))

    return Follows(share(conflicts.shape), share(conflicts.inside), share(conflicts.outside))


def counterfactual_dataset(
    dataset: AttentionDataset | InMemoryMapsDataset,
    copies: int,
    seed: int,
    guide: ABN | None = None,
    device: torch.device | None = None,
) -> InMemoryMapsDataset:
    """The fine-tuning set as tensors, plus counterfactual copies of its mapped images, or,
    with a `guide` model, of every image (cut by the guide's attention where no human map is)."""
    images, labels, maps, has_map = (
        torch.cat(parts) for parts in zip(*DataLoader(dataset, batch_size=256), strict=True)
    )
    guides = None
    if guide is not None:
        _, guides = predict_all(guide, images, device or torch.device("cpu"), 256)
    return with_counterfactuals(images, labels, maps, has_map, copies, seed, guides)


def run_seed(
    data_dir: Path,
    twin_dir: Path,
    work_dir: Path,
    config: TrainConfig,
    objectives: Sequence[Objective],
    finetune_epochs: int,
    conflicts: CueConflicts | None = None,
) -> SeedRun:
    """Train ABN and bound, fine-tune each objective, score all of them (see the module doc),
    and, given `conflicts`, say which cue each follows."""
    device = config.torch_device()
    carved = carve_validation(data_dir, work_dir / "carved", VALIDATION_FRACTION, config.seed)
    twin = carve_validation(twin_dir, work_dir / "twin", VALIDATION_FRACTION, config.seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    abn, meta = train(carved, "resnet18", "abn", config)
    seconds["abn"] = time.perf_counter() - started
    started = time.perf_counter()
    bound, bound_meta = train(twin, "resnet18", "abn", config)
    seconds["bound"] = time.perf_counter() - started
    train_images = len(AttentionDataset(carved, "train", meta.classes, 8, meta.mean, meta.std))
    budget = max(1, int(CORRECTED_FRACTION * train_images))
    chosen = select_samples(abn, meta, carved, "misclassified", None, device=device)
    picked = chosen.samples[:budget]
    if len(picked) < budget:  # fewer misclassified than the budget: the least confident next
        extra = select_samples(abn, meta, carved, "confidence", None, device=device).samples
        seen = {s.image for s in picked}
        picked += [s for s in extra if s.image not in seen][: budget - len(picked)]
    run = SeedRun(seed=config.seed, corrected=len(picked), train_images=train_images)
    models: dict[str, tuple[ABN, CheckpointMeta]] = {
        "abn": (abn, meta),
        "bound": (bound, bound_meta),
    }
    ft_config = dataclasses.replace(config, epochs=finetune_epochs)
    for objective in objectives:
        started = time.perf_counter()
        dataset = finetune_dataset(carved, meta, picked)
        start = abn
        if objective.propagate:
            start, _ = finetune(
                copy.deepcopy(abn),
                meta,
                config=ft_config,
                gamma=objective.gamma,
                dataset=dataset,
                data_label=f"{data_dir.name}: {objective.name}, its guide",
            )
        if objective.counterfactual_copies:
            dataset = counterfactual_dataset(
                dataset,
                objective.counterfactual_copies,
                config.seed,
                guide=start if objective.propagate else None,
                device=device,
            )
        tuned, _ = finetune(
            copy.deepcopy(start),
            meta,
            config=ft_config,
            gamma=objective.gamma,
            dataset=dataset,
            data_label=f"{data_dir.name}: {objective.name}",
            dont_look=objective.dont_look,
            learning_stages=objective.learning_stages,
        )
        seconds[objective.name] = time.perf_counter() - started
        models[objective.name] = (tuned, meta)
    for name, (model, model_meta) in models.items():
        run.val[name] = score(model, model_meta, carved, "test", device)
        run.test[name] = score(model, model_meta, data_dir, "test", device)
        if conflicts is not None:
            run.follows[name] = follows(model, model_meta, conflicts, device)
    run.seconds = seconds
    return run


def pooled_mcnemar(runs: Sequence[SeedRun], a: str, b: str) -> tuple[int, int, float]:
    """Test images only `a` gets right and only `b` gets right, over all seeds; exact p."""
    only_a = sum(int((r.test[a].correct & ~r.test[b].correct).sum()) for r in runs)
    only_b = sum(int((~r.test[a].correct & r.test[b].correct).sum()) for r in runs)
    p = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


def _mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def summarise(runs: Sequence[SeedRun], objectives: Sequence[Objective]) -> dict[str, Any]:
    """Per model: mean test and validation figures over seeds; the default chosen on validation."""
    names = ["abn", "bound", *(o.name for o in objectives)]
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = {
            "test_top1": [r.test[name].top1() for r in runs],
            "test_conflicting": [r.test[name].top1("conflicting") for r in runs],
            "test_agreeing": [r.test[name].top1("agreeing") for r in runs],
            "val_conflicting": [r.val[name].top1("conflicting") for r in runs],
            "map_mse": [r.test[name].map_mse for r in runs],
        }
        if name in runs[0].follows:
            for cue in ("shape", "inside", "outside"):
                rows[f"follows_{cue}"] = [getattr(r.follows[name], cue) for r in runs]
        table[name] = rows
    abn = statistics.fmean(table["abn"]["test_top1"])
    bound = statistics.fmean(table["bound"]["test_top1"])
    for name in names:
        mean = statistics.fmean(table[name]["test_top1"])
        table[name]["gap_recovered"] = (mean - abn) / (bound - abn) if bound != abn else None
    chosen = max(
        (o.name for o in objectives), key=lambda n: statistics.fmean(table[n]["val_conflicting"])
    )
    return {"models": table, "chosen_on_validation": chosen}


def report_lines(
    dataset: str, runs: Sequence[SeedRun], objectives: Sequence[Objective], command: str
) -> list[str]:
    """The markdown report of one dataset."""
    summary = summarise(runs, objectives)
    table = summary["models"]
    r0 = runs[0]
    lines = [
        f"# Objectives on `{dataset}`",
        "",
        f"Seeds {', '.join(str(r.seed) for r in runs)}; per seed the ABN trains on "
        f"{r0.train_images} TRAIN images (20% of TRAIN held out for validation) and "
        f"{r0.corrected} of them ({100 * r0.corrected / r0.train_images:.0f}%) are corrected. "
        "The bound is the same ABN trained on the shortcut-free twin. Test figures are mean ± "
        "standard deviation over seeds; nothing was chosen on them.",
        "",
        f"Regenerate: `{command}`",
        "",
        "| model | test top-1 [%] | cue names another class [%] | cue names the label [%] "
        "| gap recovered | map MSE | val top-1, cue conflicting [%] |",
        "|---|---|---|---|---|---|---|",
    ]
    described = {"abn": "ABN (no correction)", "bound": "bound: ABN without the shortcut"}
    for name, rows in table.items():
        gap = rows["gap_recovered"]
        mse = [m for m in rows["map_mse"] if m is not None]
        lines.append(
            f"| {described.get(name, name)} | {_mean_sd(rows['test_top1'])} "
            f"| {_mean_sd(rows['test_conflicting'])} | {_mean_sd(rows['test_agreeing'])} "
            f"| {'-' if gap is None or name == 'abn' else f'{100 * gap:.0f}%'} "
            f"| {_mean_sd(mse, scale=1.0, digits=4) if mse else '-'} "
            f"| {_mean_sd(rows['val_conflicting'])} |"
        )
    if r0.follows:
        lines += follows_lines(runs, described)
    lines += ["", "## Paired tests (test images of every seed pooled, exact McNemar)", ""]
    for objective in objectives:
        for other in ("proposed", "control"):
            # proposed vs control is tested once, when proposed is the objective.
            if objective.name in (other, "control") or other not in table:
                continue
            only_a, only_b, p = pooled_mcnemar(runs, other, objective.name)
            lines.append(
                f"- {objective.name} vs {other}: right only with {objective.name} on {only_b} "
                f"images, only with {other} on {only_a}; p = {p:.2g}"
            )
    lines += [
        "",
        "## Objectives",
        "",
        *(f"- `{o.name}`: {o.summary}" for o in objectives),
        "",
        f"Chosen on validation (highest mean top-1 on the validation images whose cue names "
        f"another class): **{summary['chosen_on_validation']}**.",
        "",
        "Seconds per seed: "
        + "; ".join(
            f"seed {r.seed}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.seconds.items())
            for r in runs
        ),
        "",
    ]
    return lines


def follows_lines(runs: Sequence[SeedRun], described: dict[str, str]) -> list[str]:
    """The cue-conflict table: which cue each model's predictions name, mean ± sd over seeds."""
    lines = [
        "",
        "## Which cue each model follows (cue-conflict pictures)",
        "",
        f"{len(runs)} seeds; per seed, {CONFLICT_PICTURES} generated pictures whose shape, texture "
        "inside the shape's human map and texture outside it name three different classes. A "
        "share is the predictions naming that cue's class (chance: 25 %).",
        "",
        "| model | shape [%] | texture inside the map [%] | texture outside the map [%] |",
        "|---|---|---|---|",
    ]
    for name in runs[0].follows:
        shares = [r.follows[name] for r in runs]
        lines.append(
            f"| {described.get(name, name)} | {_mean_sd([f.shape for f in shares])} "
            f"| {_mean_sd([f.inside for f in shares])} | {_mean_sd([f.outside for f in shares])} |"
        )
    return lines


def study(
    name: str,
    build: Callable[..., Path],
    data_root: Path,
    out_dir: Path,
    work_dir: Path,
    config: TrainConfig,
    seeds: Sequence[int],
    objectives: Sequence[Objective],
    finetune_epochs: int,
    command: str,
    conflicts: Callable[[int, int], CueConflicts] | None = None,
) -> dict[str, Any]:
    """Run every seed on one shortcut dataset; write report.md and metrics.json to `out_dir`.

    `build(folder, correlation=...)` writes the dataset (its default correlation) and its twin
    (correlation 0); `work_dir` holds the carved splits (symlinks), outside the results.
    `conflicts(count, seed)`, where the dataset has them, makes each seed's cue-conflict pictures.
    """
    data_dir = build(data_root / name)
    twin_dir = build(data_root / f"{name}-free", correlation=0.0)
    runs = []
    for seed in seeds:
        log.info("%s: seed %d", name, seed)
        runs.append(
            run_seed(
                data_dir,
                twin_dir,
                work_dir / f"seed{seed}",
                dataclasses.replace(config, seed=seed),
                objectives,
                finetune_epochs,
                conflicts(CONFLICT_PICTURES, seed) if conflicts else None,
            )
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text("\n".join(report_lines(name, runs, objectives, command)))
    summary = summarise(runs, objectives)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
