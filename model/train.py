"""Training an ABN (or the plain ResNet baseline) and fine-tuning an ABN with human maps.

Fine-tuning freezes the trunk, BatchNorm statistics included, so a trunk output for an
un-augmented image never changes: it is computed once and cached, and each epoch then runs only
the attention and perception branches (bench/finetune.py measures what that saves).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from model.abn import ABN, ABNOutput, build_abn
from model.checkpoint import CheckpointMeta, make_meta
from model.data import AttentionDataset, InMemoryMapsDataset, find_classes
from model.losses import abn_loss, dont_look_loss, finetune_loss
from model.resnet import build_resnet

log = logging.getLogger(__name__)

# The paper gives no value. Chosen on a validation split carved from decoy-digits' training
# split (docs/results/gamma.md): accuracy is flat in gamma, map MSE falls and insertion peaks at 3.
DEFAULT_GAMMA = 3.0

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainConfig:
    """Settings shared by training and fine-tuning; recorded in every checkpoint."""

    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # None: the ABN paper's 0.1 per 256 images, scaled to the batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    image_size: int = 224
    seed: int = 0
    device: str = "auto"
    workers: int = 0

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 0.1 * self.batch_size / 256

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device(self.device)


def sgd(params: Any, config: TrainConfig) -> torch.optim.SGD:
    """The optimiser of every training here: SGD with momentum and weight decay, as the paper."""
    return torch.optim.SGD(
        params,
        lr=config.learning_rate(),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def seed_everything(seed: int) -> torch.Generator:
    """Same seed, same run: Python, NumPy and torch RNGs, and the loaders' shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def logits_of(output: ABNOutput | torch.Tensor) -> torch.Tensor:
    """The logits a prediction is read from: ABN's perception branch, or a plain network's."""
    return output.perception_logits if isinstance(output, ABNOutput) else output


def loss_of(output: ABNOutput | torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (
        abn_loss(output, targets)
        if isinstance(output, ABNOutput)
        else F.cross_entropy(output, targets)
    )


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy of `model` over a loader of (image, label, ...) batches."""
    model.eval()
    correct = total = 0
    for images, labels, *_ in loader:
        with autocast(device):
            logits = logits_of(model(images.to(device)))
        correct += int((logits.argmax(1).cpu() == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def autocast(device: torch.device) -> torch.autocast:
    """Mixed precision on CUDA (bfloat16: no loss scaling needed); full precision on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(
    data_dir: str | Path,
    arch: str = "resnet18",
    kind: str = "abn",
    config: TrainConfig | None = None,
    pretrained: str | None = None,
    se: bool = False,
    progress: ProgressCallback | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train an ABN (`kind="abn"`) or the plain ResNet baseline from a dataset directory."""
    config = config or TrainConfig()
    device = config.torch_device()
    generator = seed_everything(config.seed)
    classes = find_classes(data_dir)
    meta = make_meta(kind, arch, classes, config.image_size, se=se)
    builder = build_abn if kind == "abn" else build_resnet
    model = builder(arch, len(classes), pretrained=pretrained, se=se).to(device)
    train_set = AttentionDataset(
        data_dir, "train", classes, config.image_size, meta.mean, meta.std, train=True
    )
    test_set = AttentionDataset(data_dir, "test", classes, config.image_size, meta.mean, meta.std)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.workers,
        drop_last=len(train_set) > config.batch_size,
    )
    test_loader = DataLoader(test_set, batch_size=config.batch_size, num_workers=config.workers)
    optimizer = sgd(model.parameters(), config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    history = []
    log.info(
        "training %s-%s on %s: %d train / %d test images, %d classes, %s",
        kind,
        arch,
        data_dir,
        len(train_set),
        len(test_set),
        len(classes),
        device,
    )
    log.info("%5s %10s %9s %9s %9s %7s", "epoch", "loss", "train", "test", "lr", "sec")
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        loss_sum = correct = seen = 0
        bar = tqdm(
            loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False, disable=None
        )
        for images, labels, *_ in bar:
            images, labels = images.to(device), labels.to(device)
            with autocast(device):
                output = model(images)
                loss = loss_of(output, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += int((logits_of(output).argmax(1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        scheduler.step()
        row = {
            "epoch": epoch,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": accuracy(model, test_loader, device),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        log.info(
            "%5d %10.4f %9.4f %9.4f %9.5f %7.1f",
            epoch,
            row["loss"],
            row["train_acc"],
            row["test_acc"],
            row["lr"],
            row["seconds"],
        )
        if progress:
            progress(row)
    meta.update(
        settings={**asdict(config), "pretrained": pretrained, "data": str(data_dir)},
        metrics={"test_top1": history[-1]["test_acc"] if history else None},
        history=history,
        parent_version=None,
    )
    return model.eval(), meta


def freeze_trunk(model: ABN, learning_stages: int = 0) -> list[nn.Parameter]:
    """Freeze the trunk (weights and BatchNorm statistics); return the parameters that learn.

    Those are the branches', and with `learning_stages` k > 0 the weights of the trunk's last k
    residual stages (layer3, then layer2, layer1) too; their BatchNorm statistics stay frozen.
    """
    trunk = model.trunk()
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    stages = [model.layer1, model.layer2, model.layer3]
    if not 0 <= learning_stages <= len(stages):
        raise ValueError(f"learning_stages must be 0..{len(stages)}, got {learning_stages}")
    learning = [p for stage in stages[len(stages) - learning_stages :] for p in stage.parameters()]
    for p in learning:
        p.requires_grad_(True)
    return [p for branch in model.branches() for p in branch.parameters()] + learning


def set_branches_train(model: ABN, batch_statistics: bool = True) -> None:
    """Branches learn, trunk stays in eval mode so its BatchNorm statistics never move.

    Without `batch_statistics` the branches' BatchNorm layers use their running statistics:
    a batch of one sample has no batch statistics to give (PyTorch refuses it).
    """
    model.eval()
    for branch in model.branches():
        branch.train()
        if not batch_statistics:
            for module in branch.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


@torch.no_grad()
def cache_features(
    model: ABN,
    dataset: AttentionDataset | InMemoryMapsDataset,
    batch_size: int,
    device: torch.device,
) -> TensorDataset:
    """Trunk outputs of every (un-augmented) image, once: the frozen trunk never changes them."""
    model.trunk().eval()
    loader = DataLoader(dataset, batch_size=batch_size)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for images, labels, maps, has_map in tqdm(
        loader, desc="caching trunk", unit="batch", leave=False, disable=None
    ):
        with autocast(device):
            feats = model.features(images.to(device))
        for bucket, value in zip(parts, (feats.float(), labels, maps, has_map), strict=True):
            bucket.append(value.to(device))
    return TensorDataset(*(torch.cat(p) for p in parts))


def finetune(
    model: ABN,
    meta: CheckpointMeta,
    data_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    gamma: float = DEFAULT_GAMMA,
    use_cache: bool = True,
    dataset: AttentionDataset | InMemoryMapsDataset | None = None,
    progress: ProgressCallback | None = None,
    data_label: str | None = None,
    dont_look: float = 0.0,
    learning_stages: int = 0,
) -> tuple[ABN, dict[str, Any]]:
    """The paper's section 4.3: branches learn L_att + L_per + gamma * ||M' - M||_2.

    The data is the train split of `data_dir`, or `dataset` (the backend passes its
    corrections); `data_label` is what the new record says it was trained on (default: the
    folder). `use_cache=False` recomputes the trunk every step; it exists to measure what
    caching saves. Two objectives beyond the paper's: `dont_look` weighs
    :func:`model.losses.dont_look_loss`, and `learning_stages` lets the trunk's last stages
    learn too (then the trunk runs every step: its output changes, so it cannot be cached).
    """
    if not isinstance(model, ABN):
        raise TypeError("fine-tuning with attention maps needs an ABN checkpoint")
    if dataset is None and data_dir is None:
        raise ValueError("finetune needs a data_dir or a dataset")
    data_label = data_label or str(data_dir)
    config = config or TrainConfig(epochs=5)
    device = config.torch_device()
    generator = seed_everything(config.seed)
    model = model.to(device)
    if dataset is None:
        dataset = AttentionDataset(
            data_dir, "train", meta.classes, meta.image_size, meta.mean, meta.std
        )
    if not dataset.has_maps():
        log.warning(
            "no human maps in %s: fine-tuning on the classification losses only", data_label
        )
    params = freeze_trunk(model, learning_stages)
    optimizer = sgd(params, config)
    use_cache = use_cache and learning_stages == 0
    source = cache_features(model, dataset, config.batch_size, device) if use_cache else dataset
    # A last batch of one sample would break BatchNorm in the branches; reshuffling each epoch
    # means the dropped remainder differs from epoch to epoch.
    loader = DataLoader(
        source,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(source) > config.batch_size,
    )
    history = []
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        set_branches_train(model, batch_statistics=len(source) > 1)
        loss_sum = seen = 0.0
        bar = tqdm(
            loader,
            desc=f"fine-tune {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=None,
        )
        for inputs, labels, maps, has_map in bar:
            inputs, labels = inputs.to(device), labels.to(device)
            maps, has_map = maps.to(device), has_map.to(device)
            with autocast(device):
                if use_cache:
                    feats = inputs
                else:
                    with torch.set_grad_enabled(learning_stages > 0):
                        feats = model.features(inputs).float()
                if dont_look and not feats.requires_grad:
                    feats.requires_grad_(True)
                output = model.forward_features(feats)
                loss = finetune_loss(output, labels, maps, has_map, gamma)
                if dont_look:
                    log_probs = output.perception_logits.float().log_softmax(dim=1).sum()
                    (grads,) = torch.autograd.grad(log_probs, feats, create_graph=True)
                    loss = loss + dont_look * dont_look_loss(grads, maps, has_map)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        row = {"epoch": epoch, "loss": loss_sum / seen, "seconds": time.perf_counter() - started}
        history.append(row)
        log.info(
            "fine-tune epoch %d/%d: loss %.4f (%.1f s)",
            epoch,
            config.epochs,
            row["loss"],
            row["seconds"],
        )
        if progress:
            progress(row)
    new_meta = meta.updated(
        parent_version=meta.version,
        settings={
            **asdict(config),
            "gamma": gamma,
            "dont_look": dont_look,
            "learning_stages": learning_stages,
            "data": data_label,
            "examples": len(dataset),  # counterfactual copies included
            "finetuned_from": meta.get("settings"),
        },
        history=history,
    )
    new_meta.pop("version", None)
    return model.eval(), new_meta
