"""The served model: one ABN per process, swappable without dropping requests.

A request reads :attr:`ServedModel.snapshot` once and runs to the end on that immutable
snapshot, so a swap (a newly published version, a rollback) can happen at any moment: requests
already running finish on the old weights and report the old version, new ones get the new
weights. The swap is a single attribute assignment, which is atomic under the GIL; no lock is
held while the model runs.

All torch work (preprocessing, forward pass, softmax) runs on one inference thread per
process, whatever thread the request came in on. Gunicorn's threaded workers would otherwise
run several passes at once, each asking torch for every core; and torch's OpenMP runtime keeps
one thread team per calling thread, whose workers spin after each op: a team per request thread
made a /predict with a do-nothing model cost ~100 ms on two cores instead of ~5 ms.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from model import load_checkpoint
from model.checkpoint import CheckpointError, CheckpointMeta
from model.edited_map import EditedPrediction, predict_input_with_map

log = logging.getLogger(__name__)

TOP_K = 3
T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """A version, its network and its record: what one request predicts with."""

    version: str
    model: nn.Module
    meta: CheckpointMeta
    device: torch.device
    transform: Any = field(repr=False)
    loaded_at: float
    source: str | None = None  # the checkpoint file it came from, if any

    @property
    def classes(self) -> list[str]:
        return self.meta.classes


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image, before it becomes Label Studio results."""

    label: str
    index: int
    score: float  # top-1 probability
    top: tuple[tuple[str, float], ...]  # the top-3 (name, probability), best first
    attention: np.ndarray  # (h, w) float32 in (0, 1), the attention branch's map
    version: str


def checkpoint_version(path: str | Path, meta: CheckpointMeta) -> str:
    """The version a checkpoint is served as: its own, or one derived from its bytes.

    A plain checkpoint (no ``version`` in its record) gets ``abn-<arch>-<sha256[:8]>``, stable
    across restarts and workers, and different for different weights, so Label Studio never
    mistakes predictions of one file for those of another.
    """
    if meta.version:
        return str(meta.version)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{meta.kind}-{meta.arch}-{digest.hexdigest()[:8]}"


class ServedModel:
    """Holds the current snapshot and turns images into :class:`Prediction` objects.

    Every ServedModel of a process (one per project model) shares the one inference thread.
    """

    _executor: ThreadPoolExecutor | None = None
    _executor_pid = -1
    _executor_lock = threading.Lock()

    def __init__(
        self,
        version: str,
        model: nn.Module,
        meta: CheckpointMeta,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        source: str | None = None,
    ) -> None:
        self.batch_size = batch_size
        self._snapshot = self._make_snapshot(version, model, meta, torch.device(device), source)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "cpu", batch_size: int = 8, warm_up: bool = True
    ) -> ServedModel:
        """Load `path` once (per process) and, by default, run one forward pass to warm up."""
        started = time.perf_counter()
        model, meta = load_checkpoint(path, device)
        served = cls(
            checkpoint_version(path, meta),
            model,
            meta,
            device=device,
            batch_size=batch_size,
            source=str(path),
        )
        if warm_up:
            served.warm_up()
        log.info(
            "loaded %s as version %s in %.1f s",
            path,
            served.version,
            time.perf_counter() - started,
        )
        return served

    @staticmethod
    def _make_snapshot(
        version: str,
        model: nn.Module,
        meta: CheckpointMeta,
        device: torch.device,
        source: str | None = None,
    ) -> Snapshot:
        meta = CheckpointMeta(meta)
        if meta.get("kind", "abn") != "abn":
            raise CheckpointError(
                f"only an ABN checkpoint can be served (it gives the attention map); "
                f"this one is kind {meta.get('kind')!r}"
            )
        model.eval()
        return Snapshot(str(version), model, meta, device, meta.transform(), time.time(), source)

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot; read it once per request and use only that."""
        return self._snapshot

    @property
    def version(self) -> str:
        return self._snapshot.version

    @property
    def classes(self) -> list[str]:
        return self._snapshot.classes

    def swap(
        self,
        version: str,
        model: nn.Module,
        meta: CheckpointMeta,
        device: str | None = None,
        source: str | None = None,
        warm_up: bool = False,
    ) -> Snapshot:
        """Serve another model from now on; returns the snapshot that was replaced.

        Everything is prepared (and, with `warm_up`, run once) before the one assignment that
        publishes it, so a concurrent reader sees either the whole old snapshot or the whole
        new one, and the first request on the new one is not slower.
        """
        old = self._snapshot
        new = self._make_snapshot(
            version, model, meta, torch.device(device) if device else old.device, source
        )
        if warm_up:
            self._warm(new)
        self._snapshot = new
        log.info("serving version %s (was %s)", new.version, old.version)
        return old

    def swap_checkpoint(self, path: str | Path) -> Snapshot:
        """Load `path`, warm it up, and serve it; returns the snapshot that was replaced."""
        device = str(self._snapshot.device)
        model, meta = load_checkpoint(path, device)
        return self.swap(
            checkpoint_version(path, meta), model, meta, source=str(path), warm_up=True
        )

    def warm_up(self) -> None:
        """One forward pass on a blank image, so the first request does not pay for it."""
        self._warm(self._snapshot)

    def _warm(self, snap: Snapshot) -> None:
        size = snap.meta.image_size
        self.predict([Image.new("RGB", (size, size))], snapshot=snap)

    def predict(
        self, images: Sequence[Image.Image], snapshot: Snapshot | None = None
    ) -> list[Prediction]:
        """Predict every image, `batch_size` at a time, all with the same snapshot."""
        snap = snapshot or self._snapshot
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            out.extend(self.run_inference(lambda b=batch: self._predict_batch(b, snap)))
        return out

    @classmethod
    def predict_with(cls, snap: Snapshot, images: Sequence[Image.Image]) -> list[Prediction]:
        """One batch through `snap`, on the process's inference thread (any project's model)."""
        return cls._inference_executor().submit(cls._predict_batch, images, snap).result()

    @classmethod
    def predict_with_map(
        cls, snap: Snapshot, image: Image.Image, edited: np.ndarray
    ) -> EditedPrediction:
        """The top-3 of `snap` with `edited` gating its perception branch in place of its own
        map (``model/edited_map.py``), on the process's inference thread."""

        def run() -> EditedPrediction:
            x = snap.transform(image.convert("RGB"))[None]
            return predict_input_with_map(snap.model, snap.classes, x, edited, TOP_K)

        return cls._inference_executor().submit(run).result()

    @staticmethod
    def _predict_batch(images: Sequence[Image.Image], snap: Snapshot) -> list[Prediction]:
        """Runs on the inference thread; returns plain Python and numpy values only."""
        if not images:
            return []
        batch = torch.stack([snap.transform(img.convert("RGB")) for img in images])
        with torch.inference_mode():
            output = snap.model(batch.to(snap.device))
            probs = torch.softmax(output.perception_logits.float(), dim=1).cpu()
            maps = output.attention[:, 0].float().cpu().numpy()
        classes = snap.classes
        k = min(TOP_K, len(classes))
        top_p, top_i = probs.topk(k, dim=1)
        results = []
        for row in range(len(images)):
            top = tuple(
                (classes[int(i)], float(p)) for p, i in zip(top_p[row], top_i[row], strict=True)
            )
            results.append(
                Prediction(
                    label=top[0][0],
                    index=int(top_i[row, 0]),
                    score=top[0][1],
                    top=top,
                    attention=np.ascontiguousarray(maps[row], dtype=np.float32),
                    version=snap.version,
                )
            )
        return results

    def run_inference(self, fn: Callable[[], T]) -> T:
        """Run `fn` on this process's inference thread and wait for its result."""
        return self._inference_executor().submit(fn).result()

    @classmethod
    def _inference_executor(cls) -> ThreadPoolExecutor:
        # Made lazily and per process id: a thread does not survive a fork, so a gunicorn
        # worker forked from a parent that already had one makes its own.
        pid = os.getpid()
        if cls._executor is None or cls._executor_pid != pid:
            with cls._executor_lock:
                if cls._executor is None or cls._executor_pid != pid:
                    executor = ThreadPoolExecutor(1, thread_name_prefix="abn-inference")
                    ServedModel._executor, ServedModel._executor_pid = executor, pid
        assert cls._executor is not None
        return cls._executor

    def info(self) -> dict[str, Any]:
        """What /status says about the served model."""
        snap = self._snapshot
        meta = snap.meta
        info = {
            "version": snap.version,
            "kind": meta.kind,
            "arch": meta.arch,
            "classes": meta.classes,
            "image_size": meta.image_size,
            "device": str(snap.device),
            "batch_size": self.batch_size,
            "loaded_at": snap.loaded_at,
            "source": snap.source,
        }
        for key in ("parent_version", "metrics", "created_at"):
            if key in meta:
                info[key] = meta[key]
        return info
