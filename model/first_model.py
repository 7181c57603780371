"""A project's first model: a whole ABN trained on the images annotators gave a class.

A new project has labelled images and no model. This trains one, from an ImageNet-pretrained
trunk when one is named (much better with a hundred images) or from scratch, with the usual
crop-and-flip augmentation, under an epoch budget and a time budget (whichever ends first), and
keeps the epoch that did best on a validation split. The tasks a round's gate holds out (a
stable share by each image's key) are left out altogether: later rounds are judged on them, so
the first model must neither learn from them nor be chosen on them. The validation split is a
second stable share of the rest. Nothing here knows where the images came from; the backend's
training job fetches them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from model.abn import build_abn
from model.checkpoint import CheckpointMeta, make_meta
from model.data import image_transform
from model.errors import UserError
from model.round import is_held_out, split
from model.train import TrainConfig, accuracy, autocast, loss_of, seed_everything, sgd

log = logging.getLogger(__name__)


class FirstModelError(UserError, ValueError):
    """Labelled images that cannot train a classifier; the message says what to label."""


@dataclass(frozen=True)
class LabelledImages:
    """The annotated images of a project: what a first model learns from."""

    images: Sequence[Image.Image]
    labels: Sequence[int]  # index into `classes`
    keys: Sequence[int]  # stable keys (task ids) for the validation split
    classes: list[str]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.labels) == len(self.keys):
            raise ValueError("images, labels and keys must have the same length")

    def counts(self) -> dict[str, int]:
        """Labelled images per class, every class listed."""
        found = Counter(self.labels)
        return {name: found.get(i, 0) for i, name in enumerate(self.classes)}


@dataclass(frozen=True)
class FirstModelConfig:
    """How a first model is trained; recorded in its checkpoint."""

    arch: str = "resnet18"
    image_size: int = 224
    epochs: int = 30
    time_budget_s: float = 240.0  # training stops after the epoch that crosses it
    batch_size: int = 16
    lr: float | None = None  # None: 0.01 with a pretrained trunk, else TrainConfig's rule
    validation_fraction: float = 0.2
    pretrained: str | None = None  # torchvision weight name (IMAGENET1K_V1) or a local file
    seed: int = 0
    device: str = "auto"


@dataclass
class FirstModelReport:
    """What training did, for the job's record and /status."""

    trained_on: int
    validated_on: int
    held_out: int  # left for the gate of the project's rounds: neither trained nor validated on
    epochs_run: int
    best_epoch: int
    validation_accuracy: float | None
    stopped_by: str  # "epochs" or "time budget"
    seconds: float
    class_counts: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Augmented(Dataset):
    """PIL images through a transform, fresh randomness at every epoch."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[int], transform: Any):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index].convert("RGB")), int(self.labels[index])


def check_trainable(data: LabelledImages) -> None:
    """Refuse what cannot make a classifier, saying what to label next."""
    if len(data.classes) < 2:
        raise FirstModelError(
            f"a classifier needs at least two classes; the label config has "
            f"{len(data.classes)} ({', '.join(data.classes) or 'none'}): add another <Choice>"
        )
    labelled = {name: n for name, n in data.counts().items() if n}
    if len(labelled) < 2:
        have = ", ".join(f"{name}: {n}" for name, n in labelled.items()) or "no labelled tasks"
        raise FirstModelError(
            f"tasks are labelled with fewer than two classes ({have}); label some tasks of "
            f"another class ({', '.join(c for c in data.classes if c not in labelled)})"
        )


def first_model_split(
    keys: tuple[int, ...], fraction: float
) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, held out for the gate) indices into `keys`. Too few to split: train
    on everything, no validation (the last epoch is kept)."""
    usable, held = split(keys, fraction)
    if set(usable) == set(held):
        return list(range(len(keys))), [], []
    val = [i for i in usable if is_held_out(keys[i], fraction, salt="first-model validation")]
    chosen = set(val)
    train = [i for i in usable if i not in chosen]
    if not val or not train:
        return usable, [], held
    return train, val, held


def train_first_model(
    data: LabelledImages,
    config: FirstModelConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[torch.nn.Module, CheckpointMeta, FirstModelReport]:
    """Train an ABN on `data`; returns the model (eval mode), its record and a report."""
    config = config or FirstModelConfig()
    check_trainable(data)
    started = time.perf_counter()
    train_cfg = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr if config.lr is not None or not config.pretrained else 0.01,
        image_size=config.image_size,
        seed=config.seed,
        device=config.device,
    )
    device = train_cfg.torch_device()
    generator = seed_everything(config.seed)
    meta = make_meta("abn", config.arch, data.classes, config.image_size)
    model = build_abn(config.arch, len(data.classes), pretrained=config.pretrained).to(device)
    train_idx, val_idx, held_out = first_model_split(tuple(data.keys), config.validation_fraction)
    train_set = _Augmented(
        [data.images[i] for i in train_idx],
        [data.labels[i] for i in train_idx],
        image_transform(config.image_size, meta.mean, meta.std, train=True),
    )
    val_loader = DataLoader(
        _Augmented(
            [data.images[i] for i in val_idx],
            [data.labels[i] for i in val_idx],
            image_transform(config.image_size, meta.mean, meta.std),
        ),
        batch_size=config.batch_size,
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(train_set) > config.batch_size,  # no batch of one for BatchNorm
    )
    optimizer = sgd(model.parameters(), train_cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    log.info(
        "first model: %s-ABN on %d images (%d for validation, %d left for the gate), %d classes, "
        "%s, %s",
        config.arch,
        len(train_idx),
        len(val_idx),
        len(held_out),
        len(data.classes),
        device,
        f"pretrained {config.pretrained}" if config.pretrained else "from scratch",
    )
    history: list[dict[str, Any]] = []
    best_state, best_epoch, best_acc = None, 0, -1.0
    stopped_by = "epochs"
    for epoch in range(1, config.epochs + 1):
        model.train()
        loss_sum = seen = 0.0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with autocast(device):
                loss = loss_of(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        scheduler.step()
        val_acc = accuracy(model, val_loader, device) if val_idx else None
        elapsed = time.perf_counter() - started
        row = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "val_acc": val_acc, "s": elapsed}
        history.append(row)
        log.info("first model epoch %d/%d: %s", epoch, config.epochs, row)
        if val_acc is None or val_acc > best_acc:
            best_acc = -1.0 if val_acc is None else val_acc
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        if progress:
            progress(row)
        if elapsed >= config.time_budget_s and epoch < config.epochs:
            stopped_by = "time budget"
            break
    assert best_state is not None  # at least one epoch ran
    model.load_state_dict(best_state)
    report = FirstModelReport(
        trained_on=len(train_idx),
        validated_on=len(val_idx),
        held_out=len(held_out),
        epochs_run=len(history),
        best_epoch=best_epoch,
        validation_accuracy=None if not val_idx else best_acc,
        stopped_by=stopped_by,
        seconds=round(time.perf_counter() - started, 1),
        class_counts=data.counts(),
        history=history,
    )
    meta.update(
        settings={**asdict(config), "lr": train_cfg.learning_rate()},
        metrics={"validation_top1": report.validation_accuracy},
        history=history,
        parent_version=None,
    )
    return model.eval(), meta, report
