"""The paper's protocol end to end on one dataset (`abn reproduce`).

1. Train a plain ResNet and an ABN of the same depth the same way (same data, schedule, seed).
2. Choose the training samples a human would correct, as the paper does: the misclassified ones
   (ImageNet, section 5.1) or all of them by confidence, lowest first (CUB), up to a budget.
3. Their maps under DIR/maps/train stand in for the human's edits; every other training sample
   still contributes the classification losses (it simply has no map).
4. Fine-tune a copy of the ABN's branches with L_att + L_per + gamma * L_map (section 4.3).
5. Evaluate the four methods (ResNet/CAM/Grad-CAM, ABN, proposed) and write the report.

Confidence is the softmax probability of the true class from the perception branch, on the
un-augmented training image, with the ABN as trained.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.abn import ABN
from model.checkpoint import CheckpointMeta, save_checkpoint
from model.data import AttentionDataset, DatasetError, Sample
from model.paper import shortcut
from model.paper.evaluate import Candidate, Evaluation, paired_top1, resolve_device, run_evaluation
from model.paper.report import check_output_dir, staged_output, write_evaluation_files
from model.train import DEFAULT_GAMMA, TrainConfig, finetune, train

log = logging.getLogger(__name__)

SELECTIONS = ("misclassified", "confidence")

# decoy-digits is drawn on a 64 px canvas; at 64 px two shared CPU cores train both networks in
# minutes. Deletion/insertion then use RISE's batch-mode step (8 rows of pixels, 9 points) on 200
# test images: the full protocol (one row per step, 65 points, 599 images) would take longer
# than the training.
DECOY_DIGITS_DEFAULTS = {"image_size": 64, "epochs": 10, "finetune_epochs": 10, "curve_limit": 200}
DECOY_DIGITS_STEP_ROWS = 8  # pixels per deletion/insertion step = 8 image rows
DEFAULTS = {"image_size": 224, "epochs": 30, "finetune_epochs": 10}


def fill_defaults(
    data: str, given: dict[str, Any], builtin: str = "decoy-digits"
) -> dict[str, Any]:
    """The settings a command line left unset (None), for this dataset; returns what was filled.

    The built-in dataset gets CPU-friendly values so that it runs in minutes without a GPU.
    """
    defaults = dict(DECOY_DIGITS_DEFAULTS if data == builtin else DEFAULTS)
    filled = {k: v for k, v in defaults.items() if given.get(k) is None}
    given.update(filled)
    if data == builtin and given.get("step") is None:
        filled["step"] = given["step"] = DECOY_DIGITS_STEP_ROWS * given["image_size"]
    return filled


__all__ = [
    "DECOY_DIGITS_DEFAULTS",
    "DEFAULTS",
    "SELECTIONS",
    "ReproduceSettings",
    "Selection",
    "fill_defaults",
    "finetune_dataset",
    "reproduce",
    "select_samples",
]


@dataclass
class ReproduceSettings:
    """What the protocol leaves open; recorded in the report."""

    arch: str = "resnet18"
    selection: str = "misclassified"
    budget: int | None = None  # None: every candidate sample (all misclassified, or all)
    gamma: float = DEFAULT_GAMMA
    finetune_epochs: int = 10
    eval_batch_size: int = 128
    limit: int | None = None  # evaluate only this many test images
    step: int | None = None  # deletion/insertion pixels per step (None: image width)
    curve_limit: int | None = None  # deletion/insertion on only this many test images
    control: bool = False  # also fine-tune with gamma = 0: what the extra training alone does

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"--selection must be one of {', '.join(SELECTIONS)}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"--budget must be >= 1, got {self.budget}")


@dataclass
class Selection:
    """The samples chosen for correction and how they were found."""

    samples: list[Sample]
    candidates: int  # samples eligible under the rule before the budget
    misclassified: int  # training samples the ABN gets wrong (with a human map)
    with_maps: int  # training samples that have a human map
    total: int
    rule: str  # the rule actually applied (a fallback is named here)


@torch.no_grad()
def true_class_confidence(
    model: ABN, dataset: AttentionDataset, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: softmax probability of the true class, and whether the prediction is right."""
    model.to(device).eval()
    probs, correct = [], []
    loader = DataLoader(dataset, batch_size=batch_size)
    for images, labels, *_ in tqdm(
        loader, desc="scoring train split", unit="batch", leave=False, disable=None
    ):
        p = model(images.to(device)).perception_logits.float().softmax(dim=1).cpu()
        probs.append(p.gather(1, labels[:, None])[:, 0])
        correct.append(p.argmax(dim=1) == labels)
    return torch.cat(probs).numpy(), torch.cat(correct).numpy()


def select_samples(
    model: ABN,
    meta: CheckpointMeta,
    data_dir: str | Path,
    selection: str,
    budget: int | None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> Selection:
    """The training samples whose human maps are used, lowest confidence first, up to budget.

    Only samples with a map under DIR/maps/train can be corrected. If ``misclassified`` finds
    none (the ABN fits its training split), the rule falls back to lowest confidence, and says so.
    """
    dataset = AttentionDataset(
        data_dir, "train", meta.classes, meta.image_size, meta.mean, meta.std
    )
    samples = dataset.samples
    with_maps = np.array([s.map is not None for s in samples])
    if not with_maps.any():
        raise DatasetError(
            f"no human maps under {Path(data_dir) / 'maps' / 'train'}: the protocol fine-tunes "
            "with them (DIR/maps/train/<class>/<name>.png)"
        )
    confidence, correct = true_class_confidence(model, dataset, batch_size, resolve_device(device))
    order = np.argsort(confidence, kind="stable")
    misclassified = with_maps & ~correct
    rule = selection
    eligible = misclassified if selection == "misclassified" else with_maps
    if selection == "misclassified" and not eligible.any():
        log.warning(
            "the ABN misclassifies none of its training samples; using the lowest-confidence ones"
        )
        rule, eligible = "confidence (no misclassified training samples)", with_maps
    chosen = [int(i) for i in order if eligible[i]]
    picked = chosen[:budget] if budget is not None else chosen
    log.info(
        "selected %d of %d training samples (%s; %d misclassified, %d with maps)",
        len(picked),
        len(samples),
        rule,
        int(misclassified.sum()),
        int(with_maps.sum()),
    )
    return Selection(
        samples=[samples[i] for i in picked],
        candidates=len(chosen),
        misclassified=int(misclassified.sum()),
        with_maps=int(with_maps.sum()),
        total=len(samples),
        rule=rule,
    )


def finetune_dataset(
    data_dir: str | Path, meta: CheckpointMeta, selected: list[Sample]
) -> AttentionDataset:
    """The whole training split, with human maps on the selected samples only."""
    dataset = AttentionDataset(
        data_dir, "train", meta.classes, meta.image_size, meta.mean, meta.std
    )
    keep = {s.image for s in selected}
    dataset.samples = [
        s if s.image in keep else dataclasses.replace(s, map=None) for s in dataset.samples
    ]
    return dataset


def _claims(evaluation: Evaluation) -> list[str]:
    """Where this run agrees with the paper's claims: proposed beats ABN on each measure."""
    m = evaluation.metrics["methods"]
    if "abn" not in m or "proposed" not in m:
        return []
    lines = ["## The paper's claims on this run", ""]
    checks = [
        ("top-1 accuracy", "top1", False, True),
        ("top-5 accuracy", "top5", False, True),
        ("insertion", "insertion", False, False),
        ("deletion", "deletion", True, False),
        ("map MSE", "map_mse", True, False),
    ]
    for name, key, lower, percent in checks:
        if key not in m["abn"] or key not in m["proposed"]:
            continue
        a, p = m["abn"][key], m["proposed"][key]
        better = p < a if lower else p > a
        verdict = "better" if better else ("equal" if p == a else "worse")
        scale, unit = (100.0, " points") if percent else (1.0, "")
        lines.append(
            f"- {name}: proposed {scale * p:.4g} vs ABN {scale * a:.4g} "
            f"({'+' if p >= a else ''}{scale * (p - a):.4g}{unit}): **{verdict}**"
        )
        if key == "top1":
            lines[-1] += _paired_text(evaluation, "abn", "ABN", evaluation, "proposed", "proposed")
    return [*lines, ""]


def _paired_text(
    ev_a: Evaluation, method_a: str, name_a: str, ev_b: Evaluation, method_b: str, name_b: str
) -> str:
    """', N only A right, M only B right, exact McNemar p = ...' or '' without per-image data."""
    paired = paired_top1(ev_a.methods[method_a], ev_b.methods[method_b])
    if paired is None:
        return ""
    only_a, only_b, p = paired
    return (
        f"; only {name_b} right on {only_b} test images, only {name_a} on {only_a} "
        f"(exact McNemar p = {p:.2g})"
    )


def reproduce(
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    settings: ReproduceSettings | None = None,
    checkpoint_dir: str | Path | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Run the protocol and write report, metrics and checkpoints; returns metrics.json's dict.

    Checkpoints go to ``checkpoint_dir`` (written as soon as each model exists) or, by default,
    to OUTDIR/checkpoints with the rest, all at the end.
    """
    settings = settings or ReproduceSettings()
    check_output_dir(out_dir)
    device = config.torch_device()
    timings: dict[str, float] = {}
    external = Path(checkpoint_dir) if checkpoint_dir is not None else None
    models: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}

    def keep(role: str, model: torch.nn.Module, meta: CheckpointMeta) -> None:
        models[role] = (model, meta)
        if external is not None:
            save_checkpoint(external / f"{role}.pt", model, meta)

    for kind in ("resnet", "abn"):
        started = time.perf_counter()
        model, meta = train(data_dir, settings.arch, kind, config)
        timings[f"train {kind}"] = time.perf_counter() - started
        keep(kind, model, meta)

    abn, abn_meta = models["abn"]
    started = time.perf_counter()
    chosen = select_samples(
        abn,
        abn_meta,
        data_dir,
        settings.selection,
        settings.budget,
        settings.eval_batch_size,
        device,
    )
    ft_config = dataclasses.replace(config, epochs=settings.finetune_epochs)
    tuned, tuned_meta = finetune(
        copy.deepcopy(abn),
        abn_meta,
        data_dir,
        ft_config,
        gamma=settings.gamma,
        dataset=finetune_dataset(data_dir, abn_meta, chosen.samples),
    )
    tuned_meta["settings"]["selection"] = {
        "rule": chosen.rule,
        "budget": settings.budget,
        "selected": len(chosen.samples),
    }
    timings["select + fine-tune"] = time.perf_counter() - started
    keep("proposed", tuned, tuned_meta)
    control = None
    if settings.control:
        started = time.perf_counter()
        control = finetune(
            copy.deepcopy(abn),
            abn_meta,
            data_dir,
            ft_config,
            gamma=0.0,
            dataset=finetune_dataset(data_dir, abn_meta, []),
        )
        timings["control fine-tune"] = time.perf_counter() - started

    started = time.perf_counter()
    evaluation = run_evaluation(
        [Candidate(role, m, meta, f"checkpoints/{role}.pt") for role, (m, meta) in models.items()],
        data_dir,
        batch_size=settings.eval_batch_size,
        device=device,
        limit=settings.limit,
        step=settings.step,
        dataset_name=dataset_name,
        curve_limit=settings.curve_limit,
    )
    sections = _claims(evaluation)
    control_eval = None
    if control is not None:
        control_eval = run_evaluation(
            [Candidate("proposed", *control, "control")],
            data_dir,
            batch_size=settings.eval_batch_size,
            device=device,
            limit=settings.limit,
            step=settings.step,
            curve_limit=settings.curve_limit,
        )
        sections += _control_lines(evaluation, control_eval)
        if external is not None:
            save_checkpoint(external / "control.pt", *control)
    if shortcut.has_cues(evaluation.samples):
        sections += _cue_lines(evaluation, control_eval, chosen)
    timings["evaluate"] = time.perf_counter() - started
    if external is not None:
        evaluation.sources = {r: str(external / f"{r}.pt") for r in models}

    sections += _protocol_lines(config, settings, chosen, timings, models)
    with staged_output(out_dir) as staging:
        if external is None:
            for role, (m, meta) in models.items():
                save_checkpoint(staging / "checkpoints" / f"{role}.pt", m, meta)
            if control is not None:
                save_checkpoint(staging / "checkpoints" / "control.pt", *control)
        write_evaluation_files(
            evaluation,
            staging,
            title=f"Reproduction on {evaluation.dataset}",
            sections=sections,
        )
    log.info("wrote %s", out_dir)
    return evaluation.metrics


def _cue_lines(evaluation: Evaluation, control: Evaluation | None, chosen: Selection) -> list[str]:
    """A shortcut dataset: accuracy where the cue misleads vs where it agrees (see shortcut)."""
    classes = evaluation.classes
    flags = shortcut.conflicting(evaluation.samples, classes)
    arch = evaluation.arch.replace("resnet", "ResNet")
    correct = {
        name: result.correct
        for name, result in (
            (arch, evaluation.methods.get("resnet")),
            (f"{arch}+ABN", evaluation.methods.get("abn")),
            ("Control (gamma 0)", control.methods.get("proposed") if control else None),
            ("Proposed", evaluation.methods.get("proposed")),
        )
        if result is not None and result.correct is not None
    }
    misleading = int(shortcut.conflicting(chosen.samples, classes).sum())
    return [
        "## Does the network use the shortcut?",
        "",
        "In the test split the cue (decoy-digits: the patch's colour) is random. A network that "
        "learnt the shortcut is right much less often where the cue names another class than "
        "where it names the label.",
        "",
        *shortcut.breakdown_lines(correct, flags),
        "",
        f"Of the {len(chosen.samples)} training images selected for correction, {misleading} have "
        "a cue naming another class.",
        "",
    ]


def _control_lines(evaluation: Evaluation, control: Evaluation) -> list[str]:
    """ABN, the no-map control and the proposed method side by side (not in metrics.json)."""
    methods = evaluation.metrics["methods"]
    rows = [
        ("ABN as trained", methods.get("abn", {})),
        ("Control: same fine-tuning, gamma = 0", control.metrics["methods"]["proposed"]),
        ("Proposed", methods.get("proposed", {})),
    ]
    keys = [k for k in ("top1", "top5", "deletion", "insertion", "map_mse") if k in rows[2][1]]
    names = {"top1": "top-1 [%]", "top5": "top-5 [%]", "map_mse": "map MSE"}
    lines = [
        "## Control: what the fine-tuning does without the maps",
        "",
        "The proposed model is trained for more epochs than the ABN it starts from. The control is "
        "fine-tuned identically (same samples, epochs, optimiser, seed) with gamma = 0, so the "
        "gap between control and proposed is what the human maps add.",
        "",
        "| Model | " + " | ".join(names.get(k, k) for k in keys) + " |",
        "|---|" + "|".join("---" for _ in keys) + "|",
    ]
    for name, values in rows:
        cells = [
            f"{100 * values[k]:.2f}" if k in ("top1", "top5") else f"{values[k]:.4f}" for k in keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for ev_a, m_a, n_a, ev_b, m_b, n_b in (
        (evaluation, "abn", "ABN", control, "proposed", "control"),
        (control, "proposed", "control", evaluation, "proposed", "proposed"),
    ):
        text = _paired_text(ev_a, m_a, n_a, ev_b, m_b, n_b)
        if text:
            lines.append(f"- top-1, {n_b} vs {n_a}" + text.replace(";", ":", 1))
    return [*lines, ""]


def _protocol_lines(
    config: TrainConfig,
    settings: ReproduceSettings,
    chosen: Selection,
    timings: dict[str, float],
    models: dict[str, tuple[torch.nn.Module, dict[str, Any]]],
) -> list[str]:
    budget = "none" if settings.budget is None else str(settings.budget)
    history = {
        role: meta.get("history", [{}])[-1]
        for role, (_, meta) in models.items()
        if role != "proposed"
    }
    lines = [
        "## Protocol",
        "",
        f"- ResNet and ABN ({settings.arch}) trained from scratch the same way: {config.epochs} "
        f"epochs, batch {config.batch_size}, SGD lr {config.learning_rate():g} (cosine), "
        f"momentum {config.momentum}, weight decay {config.weight_decay}, "
        f"{config.image_size} px, seed {config.seed}.",
        f"- Samples corrected: {len(chosen.samples)} of {chosen.total} training images "
        f"(rule: {chosen.rule}, budget {budget}; the ABN misclassified {chosen.misclassified}; "
        f"{chosen.with_maps} have a human map). Their maps under DIR/maps/train are the edits; "
        "the other images keep the classification losses only.",
        f"- Fine-tuning: trunk frozen, branches trained {settings.finetune_epochs} epochs with "
        f"L_att + L_per + gamma * ||M' - M||_2, gamma = {settings.gamma:g}, same optimiser.",
        "- Final training accuracy: "
        + ", ".join(
            f"{role} {100 * h.get('train_acc', float('nan')):.2f}%" for role, h in history.items()
        )
        + ".",
        "- Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
        "",
    ]
    return lines
