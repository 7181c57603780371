"""Seconds per fine-tuning epoch: cached trunk vs recomputed trunk vs training the whole network.

Run: ``.venv/bin/python bench/finetune.py [--image-size 224] [--images 128] [--device cpu]``.
All three are measured in one run, on the same decoy-digits images and the same ABN, so the
ratios hold even on a busy machine. The cached run's one-off cost (computing the trunk once)
is printed separately: it is paid once per job, not per epoch.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from model import build_abn
from model.checkpoint import make_meta
from model.data import AttentionDataset, find_classes
from model.losses import abn_loss
from model.paper.decoy_digits import build_decoy_digits
from model.train import TrainConfig, cache_features, finetune


def full_training_epoch(model, dataset, batch_size: int, device: torch.device) -> float:
    """One epoch of ordinary ABN training, every parameter learning."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    started = time.perf_counter()
    for images, labels, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=True):
        loss = abn_loss(model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        data = build_decoy_digits(Path(tmp) / "decoy-digits")
        classes = find_classes(data)
        meta = make_meta("abn", "resnet18", classes, args.image_size)
        dataset = AttentionDataset(data, "train", classes, args.image_size, meta.mean, meta.std)
        dataset.samples = dataset.samples[: args.images]
        torch.manual_seed(0)
        start = build_abn("resnet18", len(classes))
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device=args.device)

        started = time.perf_counter()
        cache_features(copy.deepcopy(start).to(device), dataset, args.batch_size, device)
        cache_once = time.perf_counter() - started

        per_epoch = {}
        for name, use_cache in (("cached trunk", True), ("recomputed trunk", False)):
            _, new_meta = finetune(
                copy.deepcopy(start), meta, data, config, dataset=dataset, use_cache=use_cache
            )
            seconds = [row["seconds"] for row in new_meta["history"]]
            per_epoch[name] = min(seconds)
        per_epoch["whole network"] = min(
            full_training_epoch(copy.deepcopy(start), dataset, args.batch_size, device)
            for _ in range(args.epochs)
        )

    baseline = per_epoch["cached trunk"]
    print(
        f"\nfine-tuning ABN-ResNet18, {args.images} images at {args.image_size}px, "
        f"batch {args.batch_size}, {device} (best of {args.epochs} epochs)"
    )
    print(f"{'':<18}{'s/epoch':>10}{'x cached':>10}")
    for name, seconds in per_epoch.items():
        print(f"{name:<18}{seconds:>10.2f}{seconds / baseline:>10.2f}")
    print(f"{'(trunk cache, once)':<18}{cache_once:>9.2f}s")


if __name__ == "__main__":
    main()
