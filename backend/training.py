"""The training job an RQ worker runs for one project: a first model, or a gated round.

This is the I/O around the machine learning of ``model/``:

- a project with a model of its own: a round (``model/round.py``) on its corrections and
  confirmations fine-tunes that model, and the new version is published in its lineage when
  the gate accepts it, or the served model is left untouched and the job records why;
- a project served the shared model: the same round, starting from the shared model, and the
  new version is the first of the project's own lineage (the shared model never changes);
- a project with no model: its first version (``model/first_model.py``), trained on the
  tasks annotators gave a class, with the classes of its label config, in config order.

Progress goes to the RQ job's meta, which ``/status`` shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from backend.label_config import config_classes
from backend.redis_connection import connect
from backend.registry import ModelRegistry, answering
from backend.settings import Settings
from backend.store import LoopStore
from backend.verdict import post_verdict
from model.abn import ABN
from model.checkpoint import CheckpointMeta, atomic_write, load_checkpoint
from model.edited_map import predict_input_with_map
from model.errors import UserError
from model.first_model import FirstModelConfig, LabelledImages, train_first_model
from model.maps import map_size_for
from model.round import Examples, GateMargins, compare, run_round
from model.train import TrainConfig


class TrainingRefused(UserError, RuntimeError):
    """A job that cannot train anything; the message says what the project needs."""


log = logging.getLogger(__name__)


def report_progress(**fields: Any) -> None:
    job = get_current_job()
    if job is not None:
        job.meta.update(fields)
        job.save_meta()


def fetch_images(
    annotations: list[Correction], loader: ImageLoader, size: int
) -> tuple[list[Correction], list[Any], dict[str, int]]:
    """The annotations whose images could be fetched and decoded, those images (about `size`
    pixels a side, RGB), and how many were skipped for each reason."""
    kept, images = [], []
    skipped: dict[str, int] = {}
    for i, c in enumerate(annotations):
        try:
            loaded = loader.load(c.image, project=c.project, task_id=c.task_id, size=size)
        except ImageFetchError as exc:
            log.warning("annotation %s: image skipped (%s)", c.annotation_id, exc)
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        kept.append(c)
        images.append(loaded.image.convert("RGB"))
        if i % 10 == 9:
            report_progress(fetched=len(kept), skipped_images=skipped)
    return kept, images, skipped


def load_examples(
    corrections: list[Correction], loader: ImageLoader, meta: CheckpointMeta
) -> tuple[list[Correction], torch.Tensor, dict[str, int]]:
    """The corrections whose images could be fetched, those images as model inputs, and the
    skipped images by reason."""
    transform = meta.transform()
    kept, images, skipped = fetch_images(corrections, loader, meta.image_size)
    tensors = [transform(image) for image in images]
    return kept, torch.stack(tensors) if tensors else torch.empty(0), skipped


def labels_for(corrections: list[Correction], classes: list[str]) -> torch.Tensor:
    """Class indices of the annotated classes; -1 where the annotation named none we know."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(c.label, -1) if c.label else -1 for c in corrections])


def project_classes(store: LoopStore, project: str, settings: Settings) -> tuple[str, ...]:
    """The classes of the project's label config as last seen (by /setup or a webhook)."""
    config = store.label_config(project)
    if config is None:
        raise TrainingRefused(
            f"project {project}: no label config seen yet; connect the project to the backend "
            "(Settings > Model) so that /setup sends it"
        )
    return config_classes(config, settings.other_choices)


def train_project(project: str, settings: Settings, reason: str = "") -> dict[str, Any]:
    """Train `project`'s next version; returns the record written to MODEL_DIR/jobs."""
    store = LoopStore(settings.layout.corrections_db)
    own = ModelRegistry(settings.model_dir, project)
    # Which model this round starts from is serving's rule (backend/registry.py): its own
    # lineage, else the shared model if that has the project's classes, else a first model.
    seen = store.label_config(project) is not None
    classes = project_classes(store, project, settings) if seen else None
    answer = answering(settings.model_dir, project, classes)
    if answer.own:
        return run_project_round(project, settings, store, own, own.current(), reason)
    if answer.version is not None:
        shared = ModelRegistry(settings.model_dir)
        return run_project_round(
            project, settings, store, shared, shared.current(), reason, publish_in=own
        )
    if classes is None:
        classes = project_classes(store, project, settings)  # refused: no label config seen
    return train_project_first_model(project, settings, store, own, classes, reason)


def train_project_first_model(
    project: str,
    settings: Settings,
    store: LoopStore,
    registry: ModelRegistry,
    classes: tuple[str, ...],
    reason: str,
) -> dict[str, Any]:
    """The project's first version, from the tasks annotators gave one of its classes."""
    index = {name: i for i, name in enumerate(classes)}
    labelled = [a for a in store.labelled(project) if a.label in index]
    report_progress(stage="fetching images", project=project, labelled=len(labelled))
    kept, images, skipped = fetch_images(labelled, ImageLoader(settings), settings.first_image_size)
    data = LabelledImages(
        images=images,
        labels=[index[a.label] for a in kept if a.label is not None],
        keys=[a.task_id for a in kept],
        classes=list(classes),
    )
    config = FirstModelConfig(
        arch=settings.first_arch,
        image_size=settings.first_image_size,
        epochs=settings.first_epochs,
        time_budget_s=settings.first_time_budget,
        batch_size=settings.finetune_batch_size,
        validation_fraction=settings.holdout_fraction,
        pretrained=settings.pretrained,
        device=settings.train_device,
    )

    def on_epoch(row: dict[str, Any]) -> None:
        report_progress(
            stage="training the first model",
            epoch=row["epoch"],
            epochs=config.epochs,
            loss=row["loss"],
            validation_accuracy=row["val_acc"],
            seconds=round(row["s"], 1),
            time_budget_s=config.time_budget_s,
        )

    report_progress(
        stage="training the first model", images=len(kept), skipped_images=skipped, epoch=0
    )
    model, meta, report = train_first_model(data, config, progress=on_epoch)
    ids = [a.annotation_id for a in kept]
    published = registry.publish(
        model,
        meta,
        project=project,
        reason=f"first model ({reason})" if reason else "first model",
        annotation_ids=ids,
        first_model=report.to_dict(),
        skipped_images=skipped,
    )
    # Its labels are now what later rounds are judged against (model/round.py `reference`).
    store.mark_trained(project, ids, published["version"])
    log.info(
        "project %s: published its first model %s (validation accuracy %s, %d images, %s)",
        project,
        published["version"],
        report.validation_accuracy,
        len(kept),
        report.stopped_by,
    )
    return {
        "project": project,
        "reason": reason,
        "status": "published",
        "version": published["version"],
        "first_model": {k: v for k, v in report.to_dict().items() if k != "history"},
        "new_task_ids": [a.task_id for a in kept],
        "skipped_images": skipped,
        "finished_at": time.time(),
    }


def run_project_round(
    project: str,
    settings: Settings,
    store: LoopStore,
    registry: ModelRegistry,
    current: dict[str, Any],
    reason: str,
    publish_in: ModelRegistry | None = None,
) -> dict[str, Any]:
    """A gated round on `current` of `registry`; the new version goes to `publish_in` (default:
    the same lineage; the shared model's rounds go to the project's own)."""
    started = time.time()  # annotations stored from now on are new to the next round
    since = last_round_at(settings, project, current)
    if (store.last_stored_at(project) or 0.0) <= since:
        why = f"nothing new since {current['version']}: no annotation was stored after it"
        log.info("project %s: round not trained: %s", project, why)
        return {
            "project": project,
            "reason": reason,
            "status": "skipped",
            "reasons": [why],
            "parent_version": current["version"],
            "finished_at": time.time(),
        }
    device = str(TrainConfig(device=settings.train_device).torch_device())
    model, meta = load_checkpoint(registry.checkpoint_path(current["version"]), device=device)
    meta = meta.updated(parent_version=current["version"])
    usable = round_annotations(store, project, meta)
    report_progress(stage="fetching images", project=project, annotations=len(usable))
    kept, images, skipped = load_examples(usable, ImageLoader(settings), meta)
    if not kept:
        raise TrainingRefused(
            f"project {project}: no annotation with a readable image"
            + (f" ({', '.join(f'{n} {r}' for r, n in skipped.items())} skipped)" if skipped else "")
            + "; label some tasks, or edit the attention brush of some, and submit them"
        )
    edited_top3 = record_edited_top3(store, project, model, meta, current["version"], kept, images)
    side = map_size_for(meta.image_size)
    examples = Examples(
        images=images,
        labels=labels_for(kept, meta.classes),
        maps=torch.from_numpy(
            np.stack([c.target if c.target is not None else np.zeros((side, side)) for c in kept])
        ).float()[:, None],
        keys=tuple(c.task_id for c in kept),
        has_map=torch.tensor([c.target is not None for c in kept]),
        new=torch.tensor([c.trained_in is None for c in kept]),
    )
    config = TrainConfig(
        epochs=settings.finetune_epochs,
        batch_size=settings.finetune_batch_size,
        lr=settings.finetune_lr,
        image_size=meta.image_size,
        device=device,
    )

    def on_epoch(row: dict[str, Any]) -> None:
        part = {"part": row["part"]} if "part" in row else {}  # which of a guided round's two
        report_progress(
            stage="fine-tuning", epoch=row["epoch"], epochs=config.epochs, loss=row["loss"], **part
        )

    outcome = run_round(
        model,
        meta,
        examples,
        config,
        gamma=settings.gamma,
        margins=GateMargins(
            settings.gate_accuracy_margin,
            settings.gate_map_margin,
            settings.gate_alpha,
            settings.gate_min_evidence,
            settings.gate_on,
        ),
        holdout_fraction=settings.holdout_fraction,
        data_label=f"project {project} annotations",
        progress=on_epoch,
        counterfactual_copies=settings.counterfactuals,
        learning_stages=settings.learning_stages,
        guided_copies=settings.guided_copies,
    )
    trained_ids = [kept[i].annotation_id for i in outcome.trained]
    gate_record = {
        "before": outcome.before.to_dict(),
        "after": outcome.after.to_dict(),
        "paired": outcome.comparison.to_dict(),
        "judged_on": settings.gate_on,
    }
    if outcome.views_before is not None and outcome.views_after is not None:
        # The same tasks with the outside of their human maps swapped: where a shortcut shows.
        gate_record["counterfactual"] = {
            "before": outcome.views_before.to_dict(),
            "after": outcome.views_after.to_dict(),
            "paired": compare(outcome.views_before, outcome.views_after).to_dict(),
        }
    record: dict[str, Any] = {
        "project": project,
        "reason": reason,
        "parent_version": current["version"],
        "started_at": started,
        "annotation_ids": trained_ids,
        "held_out_annotation_ids": [kept[i].annotation_id for i in outcome.held_out],
        # The gate's reference: the held-out annotations made before this round, where enough.
        "judged_annotation_ids": [kept[i].annotation_id for i in outcome.judged_on],
        # What the round's verdict tab holds: the tasks whose annotations were new to it.
        "new_task_ids": [c.task_id for c in kept if c.trained_in is None],
        "gate": gate_record,
        "settings": outcome.meta["settings"],
        "skipped_images": skipped,
        "finished_at": time.time(),
    }
    record["edited_top3"] = edited_top3
    if not outcome.accepted:
        record.update(status="rejected", reasons=outcome.refusals)
        log.warning("project %s: new model not published: %s", project, "; ".join(outcome.refusals))
        return record
    published = (publish_in or registry).publish(
        outcome.model,
        outcome.meta,
        project=project,
        reason=reason,
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


def record_edited_top3(
    store: LoopStore,
    project: str,
    model: ABN,
    meta: CheckpointMeta,
    version: str,
    corrections: list[Correction],
    images: torch.Tensor,
) -> dict[str, list[list[Any]]]:
    """The top-3 `model` gives with each edited map that has none yet (paper section 3: does
    the annotator's map make the model right?), kept on the stored correction; returns what
    was recorded, by annotation id. Done here, not in the webhook, which must answer within
    Label Studio's one second; a map that cannot be used is logged and skipped."""
    done = store.edited_top3(project)
    recorded: dict[str, list[list[Any]]] = {}
    for c, x in zip(corrections, images, strict=True):
        if not c.edited or c.target is None or c.annotation_id in done:
            continue
        try:
            top = predict_input_with_map(model, meta.classes, x[None], c.target).top
        except (ValueError, RuntimeError) as exc:
            log.warning("annotation %s: no top-3 with its map (%s)", c.annotation_id, exc)
            continue
        if store.record_edited_top3(project, c.annotation_id, c.target, version, top):
            recorded[str(c.annotation_id)] = [[name, round(p, 4)] for name, p in top]
    return recorded


def round_annotations(store: LoopStore, project: str, meta: CheckpointMeta) -> list[Correction]:
    """Every live annotation a round can learn from: a map of the model's size, or a class the
    model knows (a round of ten new edits then still sees all that the project taught)."""
    side = map_size_for(meta.image_size)
    known = set(meta.classes)
    usable = []
    for a in store.annotations(project):
        has_map = a.target is not None and a.target.shape == (side, side)
        if has_map or a.label in known:
            usable.append(a if has_map else dataclasses.replace(a, target=None))
    return usable


def last_round_at(settings: Settings, project: str, current: dict[str, Any]) -> float:
    """When the project's model last learnt, or was judged: its version's publication, or the
    end of the project's last round that trained (published or refused), if later."""
    since = float(current.get("published_at") or 0.0)
    try:
        last = json.loads(settings.layout.job_result(project).read_text())
    except (OSError, json.JSONDecodeError):
        return since
    if last.get("status") in ("published", "rejected") and last.get("parent_version"):
        since = max(since, float(last.get("started_at") or 0.0))
    return since


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
    # The record is written, and the verdict shown, before the project is released: a run
    # queued meanwhile starts on release, and its record must not be overwritten by this one.
    try:
        try:
            record = train_project(project, settings, reason)
        except Exception as exc:
            record = {
                "project": project,
                "status": "failed",
                "reasons": [f"{type(exc).__name__}: {exc}"],
                "finished_at": time.time(),
            }
            publish_outcome(settings, project, record)
            raise
        publish_outcome(settings, project, record)
    finally:
        beating.set()
        queue.release(project)
    return record


def publish_outcome(settings: Settings, project: str, record: dict[str, Any]) -> None:
    """The job record, durable before Label Studio is called, then with the verdict tab's id
    (None: not shown there)."""
    write_last_result(settings, project, record)
    record["verdict_tab"] = post_verdict(settings, project, record)
    write_last_result(settings, project, record)
