"""One round of the human-in-the-loop as pure machine learning: split, fine-tune, score, gate.

The caller (the backend's training job) gathers a project's corrections as tensors, and
publishes or records what this decides; nothing here knows where the examples came from.

1. Split: a stable share of the examples, chosen by a hash of each example's key (the task
   id), is held out, so a task stays on the same side from round to round. Too few to split:
   the gate scores every example (and the round trains on all of them).
2. The served model predicts every example once: its scores are the gate's "before", and its
   predicted class is the label of examples that carry no class it knows (their maps still
   teach it where to look).
3. Fine-tune the branches (trunk frozen) on the training share with the paper's objective.
4. Gate: on the held-out share the new model may lose at most `margins.accuracy` of accuracy
   and gain at most `margins.map_mse` of mean squared distance to the human maps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from model.abn import ABN
from model.checkpoint import CheckpointMeta
from model.data import InMemoryMapsDataset
from model.metrics import map_mse
from model.train import DEFAULT_GAMMA, TrainConfig, autocast, finetune


def is_held_out(key: int, fraction: float) -> bool:
    """A stable split: the same key is always on the same side."""
    digest = hashlib.sha256(str(key).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


@dataclass(frozen=True)
class Examples:
    """A round's data: model inputs, class indices (-1: none known), human maps, stable keys."""

    images: torch.Tensor  # (N, 3, H, W), normalised as the model expects
    labels: torch.Tensor  # (N,) int64
    maps: torch.Tensor  # (N, 1, h, w) in [0, 1]
    keys: tuple[int, ...]  # what the split hashes (task ids)

    def __post_init__(self) -> None:
        sizes = {len(self.images), len(self.labels), len(self.maps), len(self.keys)}
        if len(sizes) != 1:
            raise ValueError("images, labels, maps and keys must have the same length")

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class Scores:
    """How a model does on the held-out examples."""

    accuracy: float | None  # None when no held-out example has a known class
    map_mse: float
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateMargins:
    """How much worse than the served model a new one may be and still be published."""

    accuracy: float = 0.05
    map_mse: float = 0.01


@dataclass
class RoundOutcome:
    """The fine-tuned model and the gate's verdict, with the numbers behind it."""

    model: ABN
    meta: CheckpointMeta
    trained: list[int]  # indices into the round's examples
    held_out: list[int]
    before: Scores
    after: Scores
    refusals: list[str]

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
    predicted: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor
) -> Scores:
    """Accuracy on the examples with a known class, and mean squared distance to the maps."""
    known = labels >= 0
    accuracy = float((predicted[known] == labels[known]).float().mean()) if known.any() else None
    distance = float(map_mse(attention[:, 0], maps[:, 0]).mean()) if len(maps) else 0.0
    return Scores(accuracy=accuracy, map_mse=distance, count=len(labels))


def gate(before: Scores, after: Scores, margins: GateMargins) -> list[str]:
    """Reasons to refuse the new model; empty means it may be published.

    A loss of exactly the margin is allowed; anything beyond it is refused.
    """
    reasons = []
    old, new = before.accuracy, after.accuracy
    if old is not None and new is not None and new < old - margins.accuracy:
        reasons.append(
            f"held-out accuracy fell from {old:.3f} to {new:.3f} (margin {margins.accuracy})"
        )
    if after.map_mse > before.map_mse + margins.map_mse:
        reasons.append(
            f"distance to human maps rose from {before.map_mse:.4f} to {after.map_mse:.4f} "
            f"(margin {margins.map_mse})"
        )
    return reasons


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
) -> RoundOutcome:
    """Split, fine-tune `model`'s branches (in place), and gate it against how it was before."""
    if len(examples) == 0:
        raise ValueError("a round needs at least one example")
    margins = margins or GateMargins()
    device = config.torch_device()
    train_idx, gate_idx = split(examples.keys, holdout_fraction)
    held, trained = torch.tensor(gate_idx), torch.tensor(train_idx)
    predicted, attention = predict_all(model, examples.images, device, config.batch_size)
    before = score(predicted[held], attention[held], examples.labels[held], examples.maps[held])
    labels = torch.where(examples.labels >= 0, examples.labels, predicted)
    # An unedited brush is the annotator confirming the map: every example is a map target.
    dataset = InMemoryMapsDataset(
        examples.images[trained],
        labels[trained],
        examples.maps[trained],
        torch.ones(len(trained), dtype=torch.bool),
    )
    tuned, new_meta = finetune(
        model,
        meta,
        config=config,
        gamma=gamma,
        dataset=dataset,
        data_label=data_label,
        progress=progress,
    )
    after = score(
        *predict_all(tuned, examples.images[held], device, config.batch_size),
        examples.labels[held],
        examples.maps[held],
    )
    return RoundOutcome(
        model=tuned,
        meta=new_meta,
        trained=train_idx,
        held_out=gate_idx,
        before=before,
        after=after,
        refusals=gate(before, after, margins),
    )
