"""A simulated study of active-learning strategies, offline: which corrections help most?

An oracle annotator stands in for people: whatever tasks a round offers, it corrects with the
dataset's own human maps and classes. For each seed, an ABN is trained on TRAIN less a
validation split carved from it (``model/paper/sweep.py``'s carving; the test split is never
read), then for each strategy of ``model/selection.py`` a copy of it goes through `rounds`
rounds of `size`: the strategy ranks the tasks not corrected yet by what the current model says
of them, the oracle corrects the first `size`, and the model's branches are fine-tuned
(``model/train.py``'s ``finetune``) on every correction made so far. With `replay`, each round
also learns from that many of the pool's other images by their class alone (drawn afresh each
round; their maps stay unseen), as a project's round learns from its class-only labelled tasks:
without them a round of a few corrections can undo what the first model knew. The objective
is the paper's by default; with `counterfactual_copies`, `learning_stages` and `guided_copies`
it is the one a project's round runs with ``ABN_COUNTERFACTUALS``, ``ABN_LEARNING_STAGES`` and
``ABN_GUIDED_COPIES`` (``model/round.py``), and
`finetune_lr` is ``ABN_FINETUNE_LR``.
After each round the model is scored on the validation split with the gate's own scoring
(``model/round.py``'s ``score``: accuracy, and map distance to the human maps), on the
split's counterfactual views (``counterfactual_views``), and, on a shortcut dataset
(``model/paper/shortcut.py``), on the validation images whose cue names another class.
The gate is asked of every round too, with the validation split as the project's held-out
tasks, judging once on the tasks and once on their views: a project's held-out tasks share its
shortcut, so the report counts which judge publishes the rounds that help where it misleads.
By default the study goes on from every round, whatever the gate says; with `follow_gate`
(``tasks`` or ``counterfactual``, as ``ABN_GATE_ON``) a round that judge refuses is dropped, as
a project drops it: the next round starts again from the model before it, with the corrections
made so far (they stay in the project), and the points are those of the model being served.

    python -m model round-study --data decoy-digits --out docs/results/round-study

The question it answers (issue 13): does the best strategy reach random selection's final
accuracy with half the corrections? On a shortcut dataset it is asked of both the accuracy and
the accuracy where the shortcut misleads, which is what the corrections are for.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from model.abn import ABN
from model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from model.data import AttentionDataset, InMemoryMapsDataset
from model.paper.shortcut import conflicting, has_cues
from model.paper.sweep import carve_validation
from model.round import (
    Examples,
    GateMargins,
    Scores,
    counterfactual_views,
    fine_tuning_set,
    gate,
    predict_all,
    score,
)
from model.round_report import (
    METRICS,
    RoundPoint,
    corrections_to_reach,
    summarise,
    write_report,
)
from model.selection import STRATEGIES, Candidate, CorrectedMap, select
from model.train import DEFAULT_GAMMA, TrainConfig, autocast, finetune, train

log = logging.getLogger(__name__)

# The judges a study can follow, named as ABN_GATE_ON names them.
GATE_JUDGES = ("tasks", "counterfactual")


@dataclass(frozen=True)
class StudySettings:
    """What the study runs; every field is in the report."""

    strategies: tuple[str, ...] = ("random", "least-confident", "misclassified", "map-entropy")
    rounds: int = 6
    size: int = 20
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 6  # the first model
    finetune_epochs: int = 5  # each round
    image_size: int = 64
    batch_size: int = 32
    gamma: float = DEFAULT_GAMMA
    fraction: float = 0.2  # of TRAIN held out for validation
    device: str = "auto"
    counterfactual_copies: int = 0  # per corrected image; 0: the paper's objective
    learning_stages: int = 0  # trunk stages that learn too
    replay: int = 0  # uncorrected pool images each round also learns from, by class only
    guided_copies: bool = False  # copy every round example, cut by a guide's maps (model/round.py)
    finetune_lr: float | None = None  # each round's; None: the first model's (0.1 per 256)
    follow_gate: str | None = None  # "tasks" or "counterfactual": drop the rounds it refuses


@dataclass(frozen=True)
class Split:
    """One split as tensors, ready for the model and the scoring."""

    images: torch.Tensor
    labels: torch.Tensor
    maps: torch.Tensor
    has_map: torch.Tensor
    shortcut: torch.Tensor | None = None  # a shortcut dataset: the cue names another class
    views: torch.Tensor | None = None  # counterfactual views of the examples in `viewed`
    viewed: tuple[int, ...] = ()


@dataclass(frozen=True)
class Measured:
    """One model on the validation split: the gate's scores on the tasks and on their views,
    and the accuracy where a shortcut misleads."""

    tasks: Scores
    views: Scores | None
    shortcut: float | None


@dataclass(frozen=True)
class GateCall:
    """The gate's verdict on one round, judged on the validation tasks and on their views,
    beside what the round did where the shortcut misleads (None: no shortcut dataset)."""

    strategy: str
    seed: int
    round: int
    published_on_tasks: bool
    published_on_views: bool
    shortcut_before: float | None
    shortcut_after: float | None

    def published_by(self, judge: str) -> bool:
        """The verdict of one judge, named as ``ABN_GATE_ON`` names it."""
        return self.published_on_views if judge == "counterfactual" else self.published_on_tasks


@dataclass
class StudyResult:
    points: list[RoundPoint]
    facts: dict[str, float] = field(default_factory=dict)
    gate_calls: list[GateCall] = field(default_factory=list)


def load_split(data_dir: Path, split: str, meta: CheckpointMeta) -> Split:
    """`split` of `data_dir` as tensors; on a shortcut dataset, with its conflicting flags."""
    dataset = AttentionDataset(data_dir, split, meta.classes, meta.image_size, meta.mean, meta.std)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for batch in DataLoader(dataset, batch_size=256):
        for bucket, value in zip(parts, batch, strict=True):
            bucket.append(torch.as_tensor(value))
    images, labels, maps, has_map = (torch.cat(p) for p in parts)
    flags = None
    if has_cues(dataset.samples):
        flags = torch.from_numpy(conflicting(dataset.samples, meta.classes))
    return Split(images, labels, maps, has_map.bool(), flags)


@torch.no_grad()
def confidences(
    model: ABN, images: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 probability, class and attention map of each image (on the CPU)."""
    model.eval()
    tops, classes, maps = [], [], []
    for start in range(0, len(images), batch_size):
        with autocast(device):
            out = model(images[start : start + batch_size].to(device))
        probs = out.perception_logits.float().softmax(1).cpu()
        top, cls = probs.max(1)
        tops.append(top)
        classes.append(cls)
        maps.append(out.attention.float().cpu())
    return torch.cat(tops), torch.cat(classes), torch.cat(maps)


def with_views(split: Split, seed: int) -> Split:
    """`split` with a counterfactual view of each example that has a class and a map."""
    n = len(split.labels)
    examples = Examples(split.images, split.labels, split.maps, tuple(range(n)), split.has_map)
    views, viewed = counterfactual_views(examples, list(range(n)), seed)
    return dataclasses.replace(split, views=views, viewed=tuple(viewed))


def measure(model: ABN, val: Split, device: torch.device, batch_size: int) -> Measured:
    """The gate's scores on `val` and on its views, and the shortcut accuracy."""
    predicted, attention = predict_all(model, val.images, device, batch_size)
    tasks = score(predicted, attention, val.labels, val.maps, val.has_map)
    views = None
    if val.views is not None and val.viewed:
        rows = torch.tensor(val.viewed, dtype=torch.long)
        views = score(
            *predict_all(model, val.views, device, batch_size), val.labels[rows], val.maps[rows]
        )
    shortcut = None
    if val.shortcut is not None and bool(val.shortcut.any()):
        right = predicted[val.shortcut] == val.labels[val.shortcut]
        shortcut = float(right.float().mean())
    return Measured(tasks, views, shortcut)


def gate_call(before: Measured, after: Measured, strategy: str, seed: int, number: int) -> GateCall:
    """What the gate, with the product's default margins, says of a round on either judge."""
    margins = GateMargins()
    no_views = Scores(None, None, 0)
    return GateCall(
        strategy=strategy,
        seed=seed,
        round=number,
        published_on_tasks=not gate(before.tasks, after.tasks, margins),
        published_on_views=not gate(before.views or no_views, after.views or no_views, margins),
        shortcut_before=before.shortcut,
        shortcut_after=after.shortcut,
    )


def train_config(
    settings: StudySettings, seed: int, epochs: int, lr: float | None = None
) -> TrainConfig:
    """The study's one training configuration: the first model and each round differ only in
    their epochs and learning rate, so that a change of batch size or device reaches both."""
    return TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=settings.batch_size,
        image_size=settings.image_size,
        seed=seed,
        device=settings.device,
    )


def round_examples(
    pool: Split, corrected: Sequence[int], replay: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a round fine-tunes on: the pool indices and which of them show their human map.

    The corrected images come first, with their maps where the dataset has one; then `replay`
    of the others (all of them when fewer are left), drawn with `seed`, by class only.
    """
    chosen = set(corrected)
    others = torch.tensor([i for i in range(len(pool.labels)) if i not in chosen], dtype=torch.long)
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))
    replayed = others[order[:replay]]
    index = torch.cat([torch.tensor(list(corrected), dtype=torch.long), replayed])
    has_map = torch.zeros(len(index), dtype=torch.bool)
    has_map[: len(corrected)] = pool.has_map[index[: len(corrected)]]
    return index, has_map


def run_strategy(
    base: ABN,
    meta: CheckpointMeta,
    pool: Split,
    val: Split,
    strategy: str,
    settings: StudySettings,
    seed: int,
) -> tuple[list[RoundPoint], list[GateCall]]:
    """Rounds of one strategy from a copy of `base`: a point before them and after each, and
    the gate's verdict on each round."""
    config = train_config(settings, seed, settings.finetune_epochs, settings.finetune_lr)
    device = config.torch_device()
    model = copy.deepcopy(base).to(device)
    corrected: list[int] = []
    calls: list[GateCall] = []
    measured = measure(model, val, device, 256)

    def point(number: int) -> RoundPoint:
        views = None if measured.views is None else measured.views.accuracy
        return RoundPoint(
            strategy, number, len(corrected), measured.tasks.accuracy, measured.tasks.map_mse,
            seed, measured.shortcut, views,
        )  # fmt: skip

    points = [point(0)]
    for number in range(1, settings.rounds + 1):
        left = [i for i in range(len(pool.labels)) if i not in set(corrected)]
        if not left:
            break
        top, predicted, attention = confidences(model, pool.images[left], device, 256)
        candidates = [
            Candidate(
                task_id=task,
                score=float(top[j]),
                predicted=meta.classes[int(predicted[j])],
                labelled=meta.classes[int(pool.labels[task])],
                attention=attention[j, 0].numpy(),
            )
            for j, task in enumerate(left)
        ]
        done = [
            CorrectedMap(meta.classes[int(pool.labels[i])], pool.maps[i, 0].numpy())
            for i in corrected
            if pool.has_map[i]
        ]
        chosen = select(
            candidates, strategy, settings.size, seed=seed * 1000 + number, corrected=done
        )
        corrected += [c.task_id for c in chosen]
        index, has_map = round_examples(pool, corrected, settings.replay, seed * 1000 + number)
        data = InMemoryMapsDataset(
            pool.images[index],
            pool.labels[index],
            pool.maps[index] * has_map.view(-1, 1, 1, 1),
            has_map,
        )
        served = copy.deepcopy(model) if settings.follow_gate else model
        model, dataset = fine_tuning_set(
            model, meta, data, settings.counterfactual_copies,
            guided=settings.guided_copies, config=config, gamma=settings.gamma,
            seed=seed * 1000 + number,
            data_label=f"round {number} of {strategy}, the copies' guide",
        )  # fmt: skip
        model, _ = finetune(
            model,
            meta,
            config=config,
            gamma=settings.gamma,
            dataset=dataset,
            data_label=f"round {number} of {strategy}",
            learning_stages=settings.learning_stages,
        )
        before, measured = measured, measure(model, val, device, 256)
        calls.append(gate_call(before, measured, strategy, seed, number))
        if settings.follow_gate and not calls[-1].published_by(settings.follow_gate):
            log.info("seed %d %s round %d: refused, dropped", seed, strategy, number)
            model, measured = served, before
        points.append(point(number))
        p = points[-1]
        log.info(
            "seed %d %s round %d: %d corrections, accuracy %.4f, map distance %.4f%s",
            seed,
            strategy,
            number,
            p.corrections,
            p.accuracy or 0.0,
            p.map_mse or 0.0,
            "" if p.shortcut_accuracy is None else f", where misled {p.shortcut_accuracy:.4f}",
        )
    return points, calls


def first_model(
    carved: Path, work_dir: Path, settings: StudySettings, seed: int
) -> tuple[ABN, CheckpointMeta]:
    """The seed's ABN trained on the carved TRAIN (reused from `work_dir` when it is there)."""
    config = train_config(settings, seed, settings.epochs)
    path = work_dir / f"abn-{settings.image_size}px-{settings.epochs}ep-seed{seed}.pt"
    if path.is_file():
        log.info("reusing %s", path)
        return load_checkpoint(path)
    model, meta = train(carved, "resnet18", "abn", config)
    save_checkpoint(path, model, meta)
    return load_checkpoint(path)


def run_study(data_dir: str | Path, work_dir: str | Path, settings: StudySettings) -> StudyResult:
    """Every strategy for every seed (the first model of each seed is shared by them)."""
    unknown = sorted(set(settings.strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; one of {', '.join(STRATEGIES)}")
    if settings.replay < 0:
        raise ValueError(f"replay must be 0 or more images, not {settings.replay}")
    if settings.finetune_lr is not None and not settings.finetune_lr > 0:
        raise ValueError(f"the rounds' learning rate must be above 0, not {settings.finetune_lr}")
    if settings.follow_gate is not None and settings.follow_gate not in GATE_JUDGES:
        judges = ", ".join(GATE_JUDGES)
        raise ValueError(f"follow_gate is one of {judges}, not {settings.follow_gate!r}")
    if settings.guided_copies and not settings.counterfactual_copies:
        raise ValueError("guided copies need counterfactual copies (--counterfactuals 1 or more)")
    work_dir = Path(work_dir) / Path(data_dir).name  # a first model per dataset
    work_dir.mkdir(parents=True, exist_ok=True)
    result = StudyResult(points=[])
    started = time.perf_counter()
    for seed in settings.seeds:
        carved = carve_validation(data_dir, work_dir / f"seed{seed}", settings.fraction, seed)
        base, meta = first_model(carved, work_dir, settings, seed)
        pool = load_split(carved, "train", meta)
        val = with_views(load_split(carved, "test", meta), seed)
        result.facts.update(pool=len(pool.labels), validation=len(val.labels))
        result.facts[f"views_seed{seed}"] = len(val.viewed)
        if val.shortcut is not None:
            result.facts[f"shortcut_images_seed{seed}"] = int(val.shortcut.sum())
        for strategy in settings.strategies:
            points, calls = run_strategy(base, meta, pool, val, strategy, settings, seed)
            result.points += points
            result.gate_calls += calls
    result.facts["seconds"] = round(time.perf_counter() - started, 1)
    return result


def verdict(
    points: Sequence[RoundPoint], settings: StudySettings, facts: dict[str, float]
) -> list[str]:
    """Whether the best strategy reaches random's final accuracy with half its corrections:
    on accuracy, where a shortcut dataset has them on the images its cue misleads, and on the
    counterfactual views (one per validation image, so many more images than the misled)."""
    if "random" not in settings.strategies:
        return ["No random baseline in this study: the goal cannot be judged."]
    lines: list[str] = []
    for metric in ("accuracy", "shortcut_accuracy", "counterfactual_accuracy"):
        if any(getattr(p, metric) is not None for p in points):
            lines += verdict_on(points, settings, metric, one_image(facts, metric, settings))
    return lines


def one_image(facts: dict[str, float], metric: str, settings: StudySettings) -> float:
    """What one validation image per seed is worth on `metric`, averaged over the seeds."""
    per_seed = {
        "shortcut_accuracy": "shortcut_images_seed",
        "counterfactual_accuracy": "views_seed",
    }
    counts = [
        facts.get(f"{per_seed[metric]}{seed}", 0)
        if metric in per_seed
        else facts.get("validation", 0)
        for seed in settings.seeds
    ]
    return sum(1 / c for c in counts if c) / len(counts) if counts else 0.0


def verdict_on(
    points: Sequence[RoundPoint], settings: StudySettings, metric: str, step: float = 0.0
) -> list[str]:
    """The goal judged on one metric (a higher one is better). Random's rounds must have moved
    it by more than `step` (one validation image per seed) for its final value to mean a level
    the others can reach rather than noise."""
    name = METRICS[metric][0]
    randoms = [s for s in summarise(points, metric) if s.strategy == "random"]
    start, final = randoms[0], randoms[-1]
    half = final.corrections / 2
    if final.mean <= start.mean:
        return [
            f"On {name}: random selection's rounds did not improve on the first model "
            f"({100 * start.mean:.2f} % before, {100 * final.mean:.2f} % after "
            f'{final.corrections:g} corrections), so "reaching its final value" says nothing '
            "here: **goal not judged**.",
            "",
        ]
    gain = final.mean - start.mean
    if gain <= step + 1e-9:  # one image per seed, up to rounding, is still noise
        return [
            f"On {name}: random selection's rounds moved it by {100 * gain:.2f} points "
            f"({100 * start.mean:.2f} % to {100 * final.mean:.2f} % after "
            f"{final.corrections:g} corrections), no more than one validation image per seed "
            f"({100 * step:.2f} points), so reaching its final value is reaching noise: "
            "**goal not judged**.",
            "",
        ]
    lines = [
        f"On {name}: random selection's final mean is {100 * final.mean:.2f} % after "
        f"{final.corrections:g} corrections. Goal: another strategy at least as high after "
        f"{half:g} corrections or fewer.",
        "",
        "| strategy | corrections to reach it (mean over seeds) | within half? |",
        "|---|---|---|",
    ]
    met = []
    for strategy in settings.strategies:
        needed = corrections_to_reach(points, strategy, final.mean, metric)
        ok = needed is not None and needed <= half
        if ok and strategy != "random":
            met.append(strategy)
        shown = "never" if needed is None else f"{needed:g}"
        lines.append(f"| {strategy} | {shown} | {'yes' if ok else 'no'} |")
    lines.append("")
    lines.append(
        f"**Goal met on {name}** by {', '.join(met)}."
        if met
        else f"**Goal not met on {name}**: no strategy reached random selection's final value "
        "with half the corrections in this study."
    )
    lines.append("")
    return lines


def write_study(result: StudyResult, settings: StudySettings, out_dir: Path, command: str) -> Path:
    """report.md, the plots and points.json (every measurement) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "points.json").write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "facts": result.facts,
                "points": [asdict(p) for p in result.points],
                "gate_calls": [asdict(c) for c in result.gate_calls],
            },
            indent=1,
        )
        + "\n"
    )
    shown = ", ".join(f"{k}={v}" for k, v in asdict(settings).items())
    intro = [
        f"Command: `{command}`",
        "",
        f"Settings: {shown}.",
        "",
        f"Pool: {result.facts.get('pool', 0):g} training images (TRAIN less the validation "
        f"split); validation: {result.facts.get('validation', 0):g} images carved from TRAIN "
        "(the test split is never read). Accuracy and map distance are the gate's scoring "
        "(model/round.py) on the validation split; the oracle corrects with the dataset's human "
        "maps and classes; round 0 is the first model. Means over seeds; the plots shade the "
        f"range. Compute: {result.facts.get('seconds', 0):g} s.",
        "",
        *verdict(result.points, settings, result.facts),
    ]
    if any(p.shortcut_accuracy is not None for p in result.points):
        counts = [v for k, v in result.facts.items() if k.startswith("shortcut_images")]
        intro += [
            "",
            '"Accuracy where the shortcut misleads" is on the validation images whose cue '
            f"names another class ({', '.join(f'{c:g}' for c in counts)} per seed): few images, "
            "so a single image moves it by several points.",
        ]
    if any(p.counterfactual_accuracy is not None for p in result.points):
        counts = [v for k, v in result.facts.items() if k.startswith("views_seed")]
        intro += [
            "",
            '"Accuracy on counterfactual views" is on one view of each validation image that has '
            "a class and a map: the pixels inside its human map kept, the rest taken from another "
            "validation image, whose cue mostly names another class "
            f"({', '.join(f'{c:g}' for c in counts)} views per seed).",
        ]
    return write_report(
        result.points,
        out_dir,
        "Active-learning strategies, simulated (oracle annotator)",
        intro,
        gate_lines(result.gate_calls, settings.follow_gate),
    )


def gate_lines(calls: Sequence[GateCall], follow_gate: str | None = None) -> list[str]:
    """How each judge of the gate decided the study's rounds, against what each round did where
    the shortcut misleads (a shortcut dataset only)."""
    judged = [c for c in calls if c.shortcut_before is not None and c.shortcut_after is not None]
    if not judged:
        return []
    judge = "the views" if follow_gate == "counterfactual" else "the tasks"
    going_on = (
        "the study goes on from a round whichever the verdict"
        if follow_gate is None
        else f"a round refused on {judge} was dropped and the next one started from the model "
        "before it"
    )
    lines = [
        "## The gate on these rounds",
        "",
        "Each round judged by the product's gate (default margins) with the validation split as "
        "the project's held-out tasks: once on the tasks as they are (`ABN_GATE_ON=tasks`, the "
        "default), once on their counterfactual views (`ABN_GATE_ON=counterfactual`). A round "
        '"helps where misled" when it raised accuracy on the validation images whose cue names '
        "another class, which the held-out tasks cannot show.",
        "",
        "| judged on | rounds | published | helps where misled: published / refused "
        "| does not help: published / refused |",
        "|---|---|---|---|---|",
    ]
    for name, published in (("tasks", lambda c: c.published_on_tasks),
                            ("counterfactual views", lambda c: c.published_on_views)):  # fmt: skip
        helps = [c for c in judged if c.shortcut_after > c.shortcut_before]
        others = [c for c in judged if c not in helps]
        lines.append(
            f"| {name} | {len(judged)} | {sum(map(published, judged))} "
            f"| {sum(map(published, helps))} / {sum(not published(c) for c in helps)} "
            f"| {sum(map(published, others))} / {sum(not published(c) for c in others)} |"
        )
    lines += [
        "",
        "By round (a round is judged against the model before it, over every strategy and "
        f"seed; {going_on}):",
        "",
        "| round | rounds | helps where misled | published on tasks | published on views |",
        "|---|---|---|---|---|",
    ]
    for number in sorted({c.round for c in judged}):
        mine = [c for c in judged if c.round == number]
        lines.append(
            f"| {number} | {len(mine)} | {sum(c.shortcut_after > c.shortcut_before for c in mine)} "
            f"| {sum(c.published_on_tasks for c in mine)} "
            f"| {sum(c.published_on_views for c in mine)} |"
        )
    return [*lines, ""]


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def seeds_of(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in parse_list(text))
