"""One round of the human-in-the-loop as pure machine learning: split, fine-tune, score, gate.

The caller (the backend's training job) gathers a project's corrections as tensors, and
publishes or records what this decides; nothing here knows where the examples came from.

The examples are every labelled task of the project the round can use, not only the newest
edits: edited maps, confirmed maps, and class labels without a map, so that a round of ten
cannot undo what the model knew, and so that the gate judges on many tasks however small the
round.

1. Split: a stable share of the examples, chosen by a hash of each example's key (the task
   id), is held out, so a task stays on the same side from round to round (a project's first
   model holds out the same tasks). Too few to split: the gate scores every example (and the
   round trains on all of them).
2. The served model predicts every example once: its scores are the gate's "before", and its
   predicted class is the label of examples that carry no class it knows (their maps still
   teach it where to look).
3. Fine-tune on the training share: with the paper's objective (the branches learn, the map
   term only where there is a map), or, opt-in, with the guided objective the
   shortcut studies chose (:func:`fine_tuning_set`; with `learning_stages`, the trunk's last
   stage learns too).
4. Gate, on the held-out share, task by task (:func:`gate`), and only on its tasks annotated
   before the round where there are enough of them (:func:`reference`), so that a round cannot
   grade itself: no significant loss of accuracy
   (a one-sided sign test over the tasks whose class changed from right to wrong and back),
   no loss beyond the margins, enough held-out evidence to judge at all, and a measurable gain:
   more tasks fixed than broken, or maps closer to the human ones.
5. Counterfactual views (:func:`counterfactual_views`): each judged task with a class and a
   map is scored again with everything outside its human map taken from another judged task.
   A project's held-out tasks share its shortcut, so on them a round that stops using the
   shortcut looks worse; on the views, where the shortcut no longer agrees with the class, it
   looks better. Both are reported; ``GateMargins.on`` says which the gate judges.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from model.abn import ABN
from model.checkpoint import CheckpointMeta
from model.counterfactual import counterfactuals, with_counterfactuals
from model.data import InMemoryMapsDataset
from model.metrics import map_mse
from model.train import DEFAULT_GAMMA, TrainConfig, autocast, finetune


def is_held_out(key: int, fraction: float, salt: str = "") -> bool:
    """A stable split: the same key is always on the same side. Another `salt` draws another
    split, independent of the gate's (which has none)."""
    digest = hashlib.sha256(f"{salt}{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


@dataclass(frozen=True)
class Examples:
    """A round's data: model inputs, class indices (-1: none known), human maps, stable keys,
    and which examples have a map (None: all of them)."""

    images: torch.Tensor  # (N, 3, H, W), normalised as the model expects
    labels: torch.Tensor  # (N,) int64
    maps: torch.Tensor  # (N, 1, h, w) in [0, 1]; zeros where there is no map
    keys: tuple[int, ...]  # what the split hashes (task ids)
    has_map: torch.Tensor | None = None  # (N,) bool
    # (N,) bool: annotated since a version last learnt from or was judged on them (None: none
    # is). The gate judges a round on the held-out tasks annotated before it where it can.
    new: torch.Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.images), len(self.labels), len(self.maps), len(self.keys)}
        for extra in (self.has_map, self.new):
            if extra is not None:
                sizes.add(len(extra))
        if len(sizes) != 1:
            raise ValueError(
                "images, labels, maps, keys, has_map and new must have the same length"
            )

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def with_map(self) -> torch.Tensor:
        """Which examples have a human map, as a bool tensor."""
        if self.has_map is None:
            return torch.ones(len(self), dtype=torch.bool)
        return self.has_map.bool()


@dataclass(frozen=True)
class Scores:
    """How a model does on the held-out examples, summed up and task by task."""

    accuracy: float | None  # None when no held-out example has a known class
    map_mse: float | None  # None when no held-out example has a map
    count: int
    correct: tuple[bool, ...] = ()  # each held-out example with a known class, in order
    distances: tuple[float, ...] = ()  # each held-out example with a map, in order

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "map_mse": self.map_mse, "count": self.count}


@dataclass(frozen=True)
class GateMargins:
    """How much worse than the served model a new one may be and still be published, and what
    counts as evidence."""

    accuracy: float = 0.05  # accuracy it may lose, whatever the test says
    map_mse: float = 0.01  # mean map distance it may gain
    alpha: float = 0.05  # significance of the paired tests
    min_evidence: int = 5  # held-out tasks needed to judge at all: the sign test's least
    on: str = "tasks"  # what the gate judges: "tasks", or their "counterfactual" views

    def __post_init__(self) -> None:
        if self.on not in JUDGED_ON:
            raise ValueError(f"the gate judges one of {', '.join(JUDGED_ON)}, not {self.on!r}")


# What a round can be judged on: the held-out tasks as labelled, or their counterfactual views.
JUDGED_ON = ("tasks", "counterfactual")


def sign_test(losses: int, wins: int) -> float:
    """One-sided exact sign test: the chance of `losses` or more of ``losses + wins`` paired
    changes going the bad way if bad and good were equally likely (1.0 with no change)."""
    n = losses + wins
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(losses, n + 1)) / 2**n


@dataclass(frozen=True)
class Comparison:
    """The held-out tasks, paired: what the new model fixed and broke."""

    fixed: int  # class wrong before, right after
    broken: int  # class right before, wrong after
    maps_closer: int  # map distance fell
    maps_farther: int  # map distance rose

    @property
    def p_accuracy_worse(self) -> float:
        return sign_test(self.broken, self.fixed)

    @property
    def p_maps_worse(self) -> float:
        return sign_test(self.maps_farther, self.maps_closer)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "p_accuracy_worse": round(self.p_accuracy_worse, 4),
            "p_maps_worse": round(self.p_maps_worse, 4),
        }


def compare(before: Scores, after: Scores) -> Comparison:
    """Pair the two models' held-out scores task by task."""
    pairs = list(zip(before.correct, after.correct, strict=True))
    distances = list(zip(before.distances, after.distances, strict=True))
    return Comparison(
        fixed=sum(1 for old, new in pairs if new and not old),
        broken=sum(1 for old, new in pairs if old and not new),
        maps_closer=sum(1 for old, new in distances if new < old),
        maps_farther=sum(1 for old, new in distances if new > old),
    )


@dataclass
class RoundOutcome:
    """The fine-tuned model and the gate's verdict, with the numbers behind it."""

    model: ABN
    meta: CheckpointMeta
    trained: list[int]  # indices into the round's examples
    held_out: list[int]
    before: Scores
    after: Scores
    comparison: Comparison
    refusals: list[str]
    judged_on: list[int]  # the held-out examples the gate scored (see :func:`reference`)
    # The same models on the counterfactual views of the judged tasks with a class and a map
    # (:func:`counterfactual_views`); None with fewer than two such tasks.
    views_before: Scores | None = None
    views_after: Scores | None = None

    @property
    def accepted(self) -> bool:
        return not self.refusals


def split(keys: tuple[int, ...], fraction: float) -> tuple[list[int], list[int]]:
    """(train, gate) indices; with nothing on one side, train on all and gate on all."""
    held = [is_held_out(k, fraction) for k in keys]
    if all(held) or not any(held):
        everything = list(range(len(keys)))
        return everything, everything
    return [i for i, h in enumerate(held) if not h], [i for i, h in enumerate(held) if h]


def reference(examples: Examples, held_out: list[int], min_evidence: int) -> list[int]:
    """The held-out examples a round is judged on: those annotated before it, when there are
    at least `min_evidence` of them with a class or a map; else every held-out example.

    A round must not grade itself: a round of scrambled classes judged on its own held-out
    tasks finds the model that learnt the scrambling right. Earlier annotations, which the
    served version already learnt from or was judged on, are the reference it cannot rewrite.
    """
    if examples.new is None:
        return held_out
    evidence = (examples.labels >= 0) | examples.with_map
    earlier = [i for i in held_out if not bool(examples.new[i])]
    if sum(bool(evidence[i]) for i in earlier) >= min_evidence:
        return earlier
    return held_out


def counterfactual_views(
    examples: Examples, index: list[int], seed: int = 0
) -> tuple[torch.Tensor, list[int]]:
    """One counterfactual view of each example in `index` that has a class and a map: its
    pixels inside the human map kept, the rest taken from another of them (never itself).

    Returns the views and, for each, the example it shows. Why: held-out tasks drawn from the
    project share its shortcut (a mark, a background), so a model that leans on it scores well
    on them; a view keeps the class's evidence where the human says it is and breaks the
    shortcut's agreement with the class. Fewer than two such examples: no donor, no view.
    """
    usable = [i for i in index if int(examples.labels[i]) >= 0 and bool(examples.with_map[i])]
    if len(usable) < 2:
        return examples.images.new_empty((0, *examples.images.shape[1:])), []
    rows = torch.tensor(usable, dtype=torch.long)
    views, source = counterfactuals(
        examples.images[rows],
        examples.maps[rows],
        torch.ones(len(rows), dtype=torch.bool),
        1,
        torch.Generator().manual_seed(seed),
    )
    return views, [usable[int(j)] for j in source]


@torch.no_grad()
def predict_all(
    model: ABN, images: torch.Tensor, device: str | torch.device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and attention maps (on the CPU), a batch at a time."""
    device = torch.device(device)
    model.eval()
    classes, maps = [], []
    for start in range(0, len(images), batch_size):
        with autocast(device):
            out = model(images[start : start + batch_size].to(device))
        classes.append(out.perception_logits.float().argmax(1).cpu())
        maps.append(out.attention.float().cpu())
    if not classes:
        return torch.empty(0, dtype=torch.long), torch.empty(0, 1, 1, 1)
    return torch.cat(classes), torch.cat(maps)


def score(
    predicted: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor,
    has_map: torch.Tensor | None = None,
) -> Scores:
    """Accuracy on the examples with a known class, and squared distance to the human maps on
    the examples that have one; each also task by task."""
    known = labels >= 0
    correct = predicted[known] == labels[known]
    accuracy = float(correct.float().mean()) if known.any() else None
    mapped = torch.ones(len(labels), dtype=torch.bool) if has_map is None else has_map.bool()
    distances = map_mse(attention[mapped][:, 0], maps[mapped][:, 0]) if mapped.any() else None
    return Scores(
        accuracy=accuracy,
        map_mse=None if distances is None else float(distances.mean()),
        count=len(labels),
        correct=tuple(bool(c) for c in correct),
        distances=() if distances is None else tuple(float(d) for d in distances),
    )


def gate(
    before: Scores,
    after: Scores,
    margins: GateMargins,
    evidence_of: str = "held-out task(s) with a class or a map",
) -> list[str]:
    """Reasons to refuse the new model; empty means it may be published.

    Refused: too little held-out evidence to judge (fewer than ``margins.min_evidence`` tasks
    with a class or a map); accuracy significantly worse (one-sided sign test over the tasks
    the change made wrong and right, at ``margins.alpha``), or lower by more than the margin
    (exactly the margin is allowed); maps farther from the human ones by more than the margin,
    or significantly farther task by task; and no measurable gain (no more tasks fixed than
    broken, and maps no closer on average).
    """
    evidence = max(len(before.correct), len(before.distances))
    if evidence < margins.min_evidence:
        return [
            f"too little held-out evidence to judge: {evidence} {evidence_of}, "
            f"at least {margins.min_evidence} needed; label more tasks"
        ]
    paired = compare(before, after)
    reasons = []
    old, new = before.accuracy, after.accuracy
    if old is not None and new is not None and new < old - margins.accuracy:
        reasons.append(
            f"held-out accuracy fell from {old:.3f} to {new:.3f} (margin {margins.accuracy})"
        )
    elif paired.broken > paired.fixed and paired.p_accuracy_worse < margins.alpha:
        reasons.append(
            f"held-out accuracy fell: {paired.broken} task(s) right before are wrong now, "
            f"{paired.fixed} the other way (sign test p={paired.p_accuracy_worse:.3f})"
        )
    old_map, new_map = before.map_mse, after.map_mse
    if old_map is not None and new_map is not None:
        if new_map > old_map + margins.map_mse:
            reasons.append(
                f"distance to human maps rose from {old_map:.4f} to {new_map:.4f} "
                f"(margin {margins.map_mse})"
            )
        elif paired.maps_farther > paired.maps_closer and paired.p_maps_worse < margins.alpha:
            reasons.append(
                f"maps moved away from the human ones on {paired.maps_farther} held-out task(s), "
                f"closer on {paired.maps_closer} (sign test p={paired.p_maps_worse:.3f})"
            )
    gained_accuracy = paired.fixed > paired.broken
    gained_maps = old_map is not None and new_map is not None and new_map < old_map
    if not reasons and not (gained_accuracy or gained_maps):
        reasons.append(
            "no measurable gain on the held-out tasks: "
            f"{paired.fixed} fixed, {paired.broken} broken"
            + (
                f", map distance {old_map:.4f} -> {new_map:.4f}"
                if old_map is not None
                else "; no held-out task has a map yet, so map corrections cannot show: "
                "correct the brush of a few more tasks"
            )
        )
    return reasons


def fine_tuning_set(
    model: ABN,
    meta: CheckpointMeta,
    data: InMemoryMapsDataset,
    copies: int,
    *,
    guided: bool,
    config: TrainConfig,
    gamma: float,
    seed: int,
    data_label: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[ABN, InMemoryMapsDataset]:
    """What a round fine-tunes on, and the model it starts from: `data` with `copies`
    counterfactual copies of each example with a human map, and `model` as it is.

    `guided` (with copies): the first half of the guided objective (``counterfactual-propagated``).
    `model` is fine-tuned on `data` with the paper's objective (the guide), and every example is
    copied, cut by its human map or else by the map the guide now gives it. Why: a few human
    maps then break a cue outside the object on every labelled image, while the map loss stays
    on what people drew (the copies of class-only examples carry no map).
    """
    if not (guided and copies):
        plain = with_counterfactuals(
            data.images, data.labels, data.maps, data.has_map, copies, seed
        )
        return model, plain
    guide, _ = finetune(
        model, meta, config=config, gamma=gamma, dataset=data, data_label=data_label,
        progress=progress,
    )  # fmt: skip
    _, guides = predict_all(guide, data.images, config.torch_device(), config.batch_size)
    copied = with_counterfactuals(
        data.images, data.labels, data.maps, data.has_map, copies, seed, guides
    )
    return guide, copied


def run_round(
    model: ABN,
    meta: CheckpointMeta,
    examples: Examples,
    config: TrainConfig,
    *,
    gamma: float = DEFAULT_GAMMA,
    margins: GateMargins | None = None,
    holdout_fraction: float = 0.2,
    data_label: str = "corrections",
    progress: Callable[[dict[str, Any]], None] | None = None,
    counterfactual_copies: int = 0,
    learning_stages: int = 0,
    guided_copies: bool = False,
) -> RoundOutcome:
    """Split, fine-tune `model`'s branches (in place), and gate it against how it was before.

    `counterfactual_copies`: that many counterfactual copies of every training example with a
    map join the training share (``model/counterfactual.py``); 0 is the paper's objective.
    `learning_stages`: the trunk's last k stages learn too (:func:`model.train.freeze_trunk`);
    together with counterfactual copies, the objective the shortcut study chose on validation.
    `guided_copies`: the branches first learn with the paper's objective, and then every
    training example is copied, one without a map cut by the map the model has just learnt to
    give it (the study's ``counterfactual-propagated``).
    """
    if len(examples) == 0:
        raise ValueError("a round needs at least one example")
    margins = margins or GateMargins()
    device = config.torch_device()
    train_idx, gate_idx = split(examples.keys, holdout_fraction)
    judged = reference(examples, gate_idx, margins.min_evidence)
    held, trained = torch.tensor(judged, dtype=torch.long), torch.tensor(train_idx)
    with_map = examples.with_map
    predicted, attention = predict_all(model, examples.images, device, config.batch_size)
    before = score(
        predicted[held],
        attention[held],
        examples.labels[held],
        examples.maps[held],
        with_map[held],
    )
    views, viewed = counterfactual_views(examples, judged, seed=config.seed)
    before_views = predict_all(model, views, device, config.batch_size) if viewed else None
    labels = torch.where(examples.labels >= 0, examples.labels, predicted)
    # An unedited brush is the annotator confirming the map: every brush is a map target.
    images, labels, maps, has_map = (
        examples.images[trained],
        labels[trained],
        examples.maps[trained],
        with_map[trained],
    )
    guided = bool(guided_copies and counterfactual_copies)

    def progress_of(part: str) -> Callable[[dict[str, Any]], None] | None:
        """`progress`, each row saying which of the two fine-tunes it is (a guided round)."""
        if progress is None or not guided:
            return progress
        return lambda row: progress({**row, "part": part})

    model, dataset = fine_tuning_set(
        model, meta, InMemoryMapsDataset(images, labels, maps, has_map), counterfactual_copies,
        guided=guided, config=config, gamma=gamma, seed=config.seed,
        data_label=f"{data_label}, the copies' guide",
        progress=progress_of("1/2: the copies' guide"),
    )  # fmt: skip
    tuned, new_meta = finetune(
        model,
        meta,
        config=config,
        gamma=gamma,
        dataset=dataset,
        data_label=data_label,
        progress=progress_of("2/2: with the copies"),
        learning_stages=learning_stages,
    )
    new_meta["settings"]["counterfactual_copies"] = counterfactual_copies
    new_meta["settings"]["guided_copies"] = guided
    after = score(
        *predict_all(tuned, examples.images[held], device, config.batch_size),
        examples.labels[held],
        examples.maps[held],
        with_map[held],
    )
    views_before, views_after = score_views(views, viewed, examples, before_views, tuned, config)
    if margins.on == "counterfactual":
        refusals = [
            f"on the held-out tasks' counterfactual views, {reason}"
            for reason in gate(
                views_before or Scores(None, None, 0),
                views_after or Scores(None, None, 0),
                margins,
                evidence_of="held-out task(s) with both a class and a map",
            )
        ]
    else:
        refusals = gate(before, after, margins)
    return RoundOutcome(
        model=tuned,
        meta=new_meta,
        trained=train_idx,
        held_out=gate_idx,
        before=before,
        after=after,
        comparison=compare(before, after),
        refusals=refusals,
        judged_on=judged,
        views_before=views_before,
        views_after=views_after,
    )


def score_views(
    views: torch.Tensor,
    viewed: list[int],
    examples: Examples,
    before: tuple[torch.Tensor, torch.Tensor] | None,
    model: ABN,
    config: TrainConfig,
) -> tuple[Scores | None, Scores | None]:
    """The served model's predictions on the views (`before`) and `model`'s, scored against
    the classes and maps of the examples they show; (None, None) without views."""
    if before is None:
        return None, None
    rows = torch.tensor(viewed, dtype=torch.long)
    truth = examples.labels[rows], examples.maps[rows]
    after = predict_all(model, views, config.torch_device(), config.batch_size)
    return score(*before, *truth), score(*after, *truth)
