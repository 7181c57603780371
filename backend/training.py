"""The fine-tuning job an RQ worker runs: corrections in, a gated new version out.

This is the I/O around one round (``model/round.py`` holds its machine learning): take the
project's corrections and confirmations from the store, fetch their images, hand them to
:func:`model.round.run_round`, then publish the new version with its lineage (atomically), or
leave the served model untouched and record why. Progress goes to the RQ job's meta, which
``/status`` shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

import numpy as np
import torch
from redis.exceptions import RedisError
from rq import get_current_job

from backend.corrections import Correction
from backend.images import ImageFetchError, ImageLoader
from backend.jobs import HEARTBEAT_TTL, TrainingQueue
from backend.redis_connection import connect
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import LoopStore
from model.checkpoint import CheckpointMeta, atomic_write, load_checkpoint
from model.maps import map_size_for
from model.round import Examples, GateMargins, run_round
from model.train import TrainConfig

log = logging.getLogger(__name__)


def report_progress(**fields: Any) -> None:
    job = get_current_job()
    if job is not None:
        job.meta.update(fields)
        job.save_meta()


def load_examples(
    corrections: list[Correction], loader: ImageLoader, meta: CheckpointMeta
) -> tuple[list[Correction], torch.Tensor]:
    """The corrections whose images could be fetched, and those images as model inputs."""
    transform = meta.transform()
    kept, tensors = [], []
    for c in corrections:
        try:
            loaded = loader.load(
                c.image, project=c.project, task_id=c.task_id, size=meta.image_size
            )
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
    store = LoopStore(settings.layout.corrections_db)
    device = str(TrainConfig(device=settings.train_device).torch_device())
    current = registry.current()
    if current is None:
        raise RuntimeError("no published model to fine-tune: start the backend once first")
    model, meta = load_checkpoint(registry.checkpoint_path(current["version"]), device=device)
    meta = meta.updated(parent_version=current["version"])
    side = map_size_for(meta.image_size)
    corrections = [c for c in store.corrections(project) if c.target.shape == (side, side)]
    report_progress(stage="fetching images", project=project, corrections=len(corrections))
    kept, images = load_examples(corrections, ImageLoader(settings), meta)
    if not kept:
        raise RuntimeError(f"project {project}: no correction with a readable image")
    examples = Examples(
        images=images,
        labels=labels_for(kept, meta.classes),
        maps=torch.from_numpy(np.stack([c.target for c in kept]))[:, None],
        keys=tuple(c.task_id for c in kept),
    )
    config = TrainConfig(
        epochs=settings.finetune_epochs,
        batch_size=settings.finetune_batch_size,
        lr=settings.finetune_lr,
        image_size=meta.image_size,
        device=device,
    )

    def on_epoch(row: dict[str, Any]) -> None:
        report_progress(
            stage="fine-tuning", epoch=row["epoch"], epochs=config.epochs, loss=row["loss"]
        )

    outcome = run_round(
        model,
        meta,
        examples,
        config,
        gamma=settings.gamma,
        margins=GateMargins(settings.gate_accuracy_margin, settings.gate_map_margin),
        holdout_fraction=settings.holdout_fraction,
        data_label=f"project {project} corrections",
        progress=on_epoch,
    )
    trained_ids = [kept[i].annotation_id for i in outcome.trained]
    gate_record = {"before": outcome.before.to_dict(), "after": outcome.after.to_dict()}
    record: dict[str, Any] = {
        "project": project,
        "reason": reason,
        "parent_version": current["version"],
        "annotation_ids": trained_ids,
        "held_out_annotation_ids": [kept[i].annotation_id for i in outcome.held_out],
        "gate": gate_record,
        "settings": outcome.meta["settings"],
        "finished_at": time.time(),
    }
    if not outcome.accepted:
        record.update(status="rejected", reasons=outcome.refusals)
        log.warning("project %s: new model not published: %s", project, "; ".join(outcome.refusals))
        return record
    published = registry.publish(
        outcome.model,
        outcome.meta,
        project=project,
        annotation_ids=trained_ids,
        gate=gate_record,
        settings=outcome.meta["settings"],
    )
    # Held-out corrections were used too (by the gate): neither kind counts towards the next
    # round's trigger.
    store.mark_trained(project, [c.annotation_id for c in kept], published["version"])
    record.update(status="published", version=published["version"])
    log.info("project %s: published %s", project, published["version"])
    return record


def write_last_result(settings: Settings, project: str, record: dict[str, Any]) -> None:
    with atomic_write(settings.layout.job_result(project), "w") as f:
        json.dump(record, f, indent=1)


def run_training_job(project: str, reason: str = "") -> dict[str, Any]:
    """The RQ entry point. Whatever happens, the project is freed and the outcome recorded."""
    settings = Settings.from_env()
    store = LoopStore(settings.layout.corrections_db)
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
