"""The fine-tuning job an RQ worker runs: corrections in, a gated new version out.

1. Take the project's corrections (and confirmations) from the store, fetch their images.
2. Hold some out (chosen by task id, so the split is stable from round to round).
3. Fine-tune the served model's branches on the rest, the trunk frozen and cached.
4. Gate: on the held-out images, the new model must not be worse than the served one by more
   than the set margins, in accuracy and in distance to the human maps.
5. Publish (atomically) with the lineage, or leave the served model untouched and say why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from typing import Any

import numpy as np
import torch
from redis.exceptions import RedisError
from rq import get_current_job

from backend.corrections import Correction, CorrectionStore
from backend.images import ImageFetchError, ImageLoader
from backend.jobs import HEARTBEAT_TTL, TrainingQueue
from backend.redis_connection import connect
from backend.registry import ModelRegistry
from backend.settings import Settings
from model.abn import ABN
from model.checkpoint import atomic_write, load_checkpoint
from model.data import InMemoryMapsDataset, image_transform
from model.maps import map_size_for
from model.metrics import map_mse
from model.train import TrainConfig, autocast, finetune

log = logging.getLogger(__name__)


class GateRejected(RuntimeError):
    """The fine-tuned model was worse than the served one on held-out data."""


def is_held_out(task_id: int, fraction: float) -> bool:
    """A stable split: the same task is always on the same side."""
    digest = hashlib.sha256(str(task_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def report_progress(**fields: Any) -> None:
    job = get_current_job()
    if job is not None:
        job.meta.update(fields)
        job.save_meta()


@torch.no_grad()
def predict_all(
    model: ABN, images: torch.Tensor, device: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and attention maps (on the CPU), a batch at a time."""
    model.eval()
    classes, maps = [], []
    for start in range(0, len(images), batch_size):
        with autocast(torch.device(device)):
            out = model(images[start : start + batch_size].to(device))
        classes.append(out.perception_logits.float().argmax(1).cpu())
        maps.append(out.attention.float().cpu())
    return torch.cat(classes), torch.cat(maps)


def held_out_scores(
    predicted: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor
) -> dict[str, float | None]:
    """Accuracy on labelled held-out images, and mean squared distance to their human maps."""
    known = labels >= 0
    accuracy = float((predicted[known] == labels[known]).float().mean()) if known.any() else None
    distance = float(map_mse(attention[:, 0], maps[:, 0]).mean())
    return {"accuracy": accuracy, "map_mse": distance, "count": len(labels)}


def gate(
    old: dict[str, float | None], new: dict[str, float | None], settings: Settings
) -> list[str]:
    """Reasons to refuse the new model; empty means it may be published."""
    reasons = []
    before, after = old["accuracy"], new["accuracy"]
    if before is not None and after is not None and after < before - settings.gate_accuracy_margin:
        reasons.append(
            f"held-out accuracy fell from {before:.3f} to {after:.3f} "
            f"(margin {settings.gate_accuracy_margin})"
        )
    if new["map_mse"] > old["map_mse"] + settings.gate_map_margin:
        reasons.append(
            f"distance to human maps rose from {old['map_mse']:.4f} to {new['map_mse']:.4f} "
            f"(margin {settings.gate_map_margin})"
        )
    return reasons


def load_examples(
    corrections: list[Correction], loader: ImageLoader, meta: dict[str, Any]
) -> tuple[list[Correction], torch.Tensor]:
    """The corrections whose images could be fetched, and those images as model inputs."""
    transform = image_transform(meta["image_size"], meta["mean"], meta["std"])
    kept, tensors = [], []
    for c in corrections:
        try:
            loaded = loader.load(c.image, project=c.project, task_id=c.task_id)
        except ImageFetchError as exc:
            log.warning("annotation %s: image skipped (%s)", c.annotation_id, exc)
            continue
        kept.append(c)
        tensors.append(transform(loaded.image.convert("RGB")))
    return kept, torch.stack(tensors) if tensors else torch.empty(0)


def labels_for(corrections: list[Correction], classes: list[str]) -> torch.Tensor:
    """Class indices of the annotated classes; -1 where the annotation named none we know."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(c.label, -1) if c.label else -1 for c in corrections])


def train_project(project: str, settings: Settings, reason: str = "") -> dict[str, Any]:
    """Run one round for `project`; returns the record written to MODEL_DIR/jobs."""
    registry = ModelRegistry(settings.model_dir)
    store = CorrectionStore(settings.model_dir / "corrections.sqlite3")
    device = str(TrainConfig(device=settings.train_device).torch_device())
    current = registry.current()
    if current is None:
        raise RuntimeError("no published model to fine-tune: start the backend once first")
    model, meta = load_checkpoint(registry.checkpoint_path(current["version"]), device=device)
    meta = {**meta, "parent_version": current["version"]}
    corrections = [c for c in store.corrections(project) if c.target.shape[0] > 0]
    side = map_size_for(meta["image_size"])
    corrections = [c for c in corrections if c.target.shape == (side, side)]
    report_progress(stage="fetching images", project=project, corrections=len(corrections))
    examples, images = load_examples(corrections, ImageLoader(settings), meta)
    if not examples:
        raise RuntimeError(f"project {project}: no correction with a readable image")
    labels = labels_for(examples, meta["classes"])
    maps = torch.from_numpy(np.stack([c.target for c in examples]))[:, None]
    # An unedited brush is the annotator confirming the map: it is a target too.
    has_map = torch.ones(len(examples), dtype=torch.bool)
    held = torch.tensor([is_held_out(c.task_id, settings.holdout_fraction) for c in examples])
    if held.all() or not held.any():
        held = torch.zeros(len(examples), dtype=torch.bool)  # too few to split: gate on all
    gate_idx = held.nonzero()[:, 0] if held.any() else torch.arange(len(examples))
    train_idx = (~held).nonzero()[:, 0]
    # One pass of the served model: its scores for the gate, and its prediction as the label of
    # samples without a class it knows (they still teach the map).
    batch = settings.finetune_batch_size
    predicted, attention = predict_all(model, images, device, batch)
    old_scores = held_out_scores(
        predicted[gate_idx], attention[gate_idx], labels[gate_idx], maps[gate_idx]
    )
    train_labels = torch.where(labels >= 0, labels, predicted)
    dataset = InMemoryMapsDataset(
        images[train_idx], train_labels[train_idx], maps[train_idx], has_map[train_idx]
    )
    config = TrainConfig(
        epochs=settings.finetune_epochs,
        batch_size=settings.finetune_batch_size,
        lr=settings.finetune_lr,
        image_size=meta["image_size"],
        device=device,
    )

    def on_epoch(row: dict[str, Any]) -> None:
        report_progress(
            stage="fine-tuning", epoch=row["epoch"], epochs=config.epochs, loss=row["loss"]
        )

    model, new_meta = finetune(
        model,
        meta,
        f"project {project}",
        config,
        gamma=settings.gamma,
        dataset=dataset,
        progress=on_epoch,
    )
    new_scores = held_out_scores(
        *predict_all(model, images[gate_idx], device, batch), labels[gate_idx], maps[gate_idx]
    )
    trained_ids = [examples[i].annotation_id for i in train_idx.tolist()]
    record: dict[str, Any] = {
        "project": project,
        "reason": reason,
        "parent_version": current["version"],
        "annotation_ids": trained_ids,
        "held_out_annotation_ids": [examples[i].annotation_id for i in gate_idx.tolist()],
        "gate": {"before": old_scores, "after": new_scores},
        "settings": new_meta["settings"],
        "finished_at": time.time(),
    }
    refused = gate(old_scores, new_scores, settings)
    if refused:
        record.update(status="rejected", reasons=refused)
        log.warning("project %s: new model not published: %s", project, "; ".join(refused))
        return record
    published = registry.publish(
        model,
        new_meta,
        project=project,
        annotation_ids=trained_ids,
        gate=record["gate"],
        settings=new_meta["settings"],
    )
    # Held-out corrections were used too (by the gate): neither kind counts towards the next
    # round's trigger.
    store.mark_trained(project, [c.annotation_id for c in examples], published["version"])
    record.update(status="published", version=published["version"])
    log.info("project %s: published %s", project, published["version"])
    return record


def write_last_result(settings: Settings, project: str, record: dict[str, Any]) -> None:
    path = settings.model_dir / "jobs" / f"{project}.json"
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=1)


def run_training_job(project: str, reason: str = "") -> dict[str, Any]:
    """The RQ entry point. Whatever happens, the project is freed and the outcome recorded."""
    settings = Settings.from_env()
    store = CorrectionStore(settings.model_dir / "corrections.sqlite3")
    queue = TrainingQueue(connect(settings.redis_url), store)
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(HEARTBEAT_TTL / 3):
            with contextlib.suppress(RedisError):
                queue.heartbeat(project)

    queue.heartbeat(project)
    threading.Thread(target=beat, name="job-heartbeat", daemon=True).start()
    try:
        record = train_project(project, settings, reason)
    except Exception as exc:
        record = {
            "project": project,
            "status": "failed",
            "reasons": [f"{type(exc).__name__}: {exc}"],
            "finished_at": time.time(),
        }
        write_last_result(settings, project, record)
        raise
    finally:
        beating.set()
        queue.release(project)
    write_last_result(settings, project, record)
    return record
