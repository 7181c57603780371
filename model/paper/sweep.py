"""Choosing the map-loss weight gamma on a validation split carved from TRAIN, never from test.

The paper gives no value for gamma. This trains one ABN on part of the training split, then
fine-tunes copies of it with each (selection, budget, gamma) and scores them on the held-out
part, which is treated as the test split (its human maps come from DIR/maps/train). gamma = 0 is
the control: the same fine-tuning without the map loss, so any gain it shows is not the maps'.

    abn sweep --data decoy-digits --out docs/results/gamma.md

For a shortcut dataset one more column is reported: accuracy on the validation images whose cue
names another class (read from the dataset's cues file), the closest in-train stand-in for the
test split, where the decoy is random. It is a diagnostic; the choice uses plain validation
accuracy first, then map MSE.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from model.data import AttentionDataset, find_classes, list_samples
from model.paper.evaluate import Candidate, Evaluation, run_evaluation
from model.paper.reproduce import finetune_dataset, select_samples
from model.paper.shortcut import conflicting
from model.train import TrainConfig, finetune, train

log = logging.getLogger(__name__)


def carve_validation(data_dir: str | Path, out_dir: str | Path, fraction: float, seed: int) -> Path:
    """A dataset of symlinks: TRAIN minus a stratified ``fraction`` as train, that part as test."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    classes = find_classes(data_dir)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for sample in list_samples(data_dir, "train", classes):
        by_class.setdefault(sample.label, []).append(sample)
    for label, samples in by_class.items():
        held = set(rng.permutation(len(samples))[: round(fraction * len(samples))].tolist())
        for i, sample in enumerate(samples):
            split = "test" if i in held else "train"
            pairs = [(sample.image, out_dir / split / classes[label] / sample.image.name)]
            if sample.map is not None:
                pairs.append(
                    (sample.map, out_dir / "maps" / split / classes[label] / sample.map.name)
                )
            for source, link in pairs:
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    os.symlink(source, link)
    return out_dir


def decoy_conflicts(data_dir: Path, split: str, classes: list[str]) -> list[bool]:
    """A shortcut dataset only: whether each image's cue names another class."""
    return conflicting(list_samples(data_dir, split, classes), classes).tolist()


@torch.no_grad()
def conflict_accuracy(
    model: torch.nn.Module, meta: CheckpointMeta, data: Path, flags: list[bool]
) -> float:
    """Top-1 on the validation images flagged by :func:`decoy_conflicts`."""
    dataset = AttentionDataset(data, "test", meta.classes, meta.image_size, meta.mean, meta.std)
    chosen = [i for i, f in enumerate(flags) if f]
    dataset.samples = [dataset.samples[i] for i in chosen]
    correct = 0
    model.eval()
    device = next(model.parameters()).device
    for images, labels, *_ in torch.utils.data.DataLoader(dataset, batch_size=128):
        out = model(images.to(device))
        correct += int((out.perception_logits.argmax(1).cpu() == labels).sum())
    return correct / max(len(chosen), 1)


def _row(name: str, evaluation: Evaluation, method: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"setting": name, **evaluation.metrics["methods"][method], **extra}


def sweep(
    data_dir: str | Path,
    work_dir: str | Path,
    config: TrainConfig,
    settings: Sequence[tuple[str, int | None, float]],
    finetune_epochs: int,
    fraction: float = 0.2,
    step: int | None = None,
    curve_limit: int | None = 100,
    decoy: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of validation metrics, one per setting (the ABN as trained first), and run facts."""
    work_dir = Path(work_dir)
    carved = carve_validation(data_dir, work_dir / "carved", fraction, config.seed)
    abn_path = work_dir / f"abn-{config.image_size}px-{config.epochs}ep-seed{config.seed}.pt"
    started = time.perf_counter()
    if abn_path.is_file():  # the expensive part; its name records what it was trained with
        abn, meta = load_checkpoint(abn_path)
        log.info("reusing %s", abn_path)
    else:
        abn, meta = train(carved, "resnet18", "abn", config)
        save_checkpoint(abn_path, abn, meta)
    facts: dict[str, Any] = {
        "train": len(list_samples(carved, "train", meta["classes"])),
        "val": len(list_samples(carved, "test", meta["classes"])),
        "train_seconds": time.perf_counter() - started,
    }
    flags = decoy_conflicts(carved, "test", meta["classes"]) if decoy else None
    if flags is not None:
        facts["conflicting"] = sum(flags)

    def score(name: str, role: str, model: torch.nn.Module, m: dict, extra: dict) -> None:
        evaluation = run_evaluation(
            [Candidate(role, model, m, name)],
            carved,
            batch_size=128,
            device=config.torch_device(),
            step=step,
            curve_limit=curve_limit,
        )
        if flags is not None:
            extra = {**extra, "conflict_top1": conflict_accuracy(model, m, carved, flags)}
        rows.append(_row(name, evaluation, role, extra))
        log.info("%s: %s", name, rows[-1])

    rows: list[dict[str, Any]] = []
    score("ABN as trained", "abn", abn, meta, {"selected": 0})
    ft_config = dataclasses.replace(config, epochs=finetune_epochs)
    done: set[tuple] = set()  # (gamma, selected images): settings that would repeat a run
    for selection, budget, gamma in settings:
        chosen = select_samples(abn, meta, carved, selection, budget, 128, config.device)
        picked = tuple(sorted(str(s.image) for s in chosen.samples))
        key = (gamma, () if gamma == 0 else picked)  # gamma 0 ignores the maps
        if key in done:
            log.info(
                "skipping %s, budget %s, gamma %g: same maps as a row above",
                selection,
                budget,
                gamma,
            )
            continue
        done.add(key)
        started = time.perf_counter()
        tuned, tuned_meta = finetune(
            copy.deepcopy(abn),
            meta,
            carved,
            ft_config,
            gamma=gamma,
            dataset=finetune_dataset(carved, meta, chosen.samples),
        )
        seconds = time.perf_counter() - started
        name = (
            "gamma 0 (no map loss)"
            if gamma == 0
            else f"{chosen.rule}, budget {budget or 'all'}, gamma {gamma:g}"
        )
        used = len(chosen.samples) if gamma else 0
        extra = {"selected": used, "gamma": gamma, "seconds": seconds}
        score(name, "proposed", tuned, tuned_meta, extra)
    return rows, facts


def render(rows: list[dict[str, Any]], facts: dict[str, Any], command: str) -> str:
    """The sweep as a markdown table, best validation top-1 in bold."""
    has_conflict = any("conflict_top1" in r for r in rows)
    has_mse = any("map_mse" in r for r in rows)
    header = ["Setting", "maps used", "val top-1 [%]"]
    header += ["top-1 decoy-conflicting [%]"] if has_conflict else []
    header += ["deletion", "insertion"] + (["map MSE"] if has_mse else [])
    best = max(r["top1"] for r in rows)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in rows:
        top1 = f"{100 * r['top1']:.2f}"
        cells = [r["setting"], str(r["selected"]), f"**{top1}**" if r["top1"] == best else top1]
        if has_conflict:
            cells.append(f"{100 * r['conflict_top1']:.2f}")
        cells += [f"{r['deletion']:.4f}", f"{r['insertion']:.4f}"]
        if has_mse:
            cells.append(f"{r['map_mse']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    intro = [
        "# gamma, budget and selection on a validation split carved from TRAIN",
        "",
        f"Command: `{command}`",
        "",
        f"ABN trained on {facts['train']} training images; validation: {facts['val']} held-out "
        "training images"
        + (
            f" (same decoy correlation as TRAIN), {facts['conflicting']} of them with a decoy of "
            "another class's colour."
            if "conflicting" in facts
            else "."
        ),
        "",
    ]
    return "\n".join([*intro, *lines, ""])
