"""Checkpoints: one file with the weights and the record a served model must carry.

A checkpoint is written atomically (a temporary file in the same folder, fsync, rename), so a
reader never sees half a file, and read with ``torch.load(weights_only=True)``, so loading one
never runs code. The metadata says what the weights are (kind, architecture, classes) and how
inputs must look (size, normalisation); a file that disagrees with its own record, or with what
the caller expects, is refused with an error that says which.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from model.abn import build_abn
from model.errors import UserError
from model.resnet import build_resnet

FORMAT = "abn-checkpoint"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = {"abn": build_abn, "resnet": build_resnet}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: missing, truncated, foreign, or of another model."""


class CheckpointMeta(dict[str, Any]):
    """The record a checkpoint carries, with typed access to the fields every one has.

    It stays a dict (what ``load_checkpoint`` has always returned, and what is saved: any
    extra keys such as settings, metrics and lineage ride along), but code reads the common
    fields as attributes (``meta.classes``, ``meta.image_size``) and gets the input transform
    from :meth:`transform` instead of spelling out size, mean and std each time.
    """

    REQUIRED = ("kind", "arch", "classes", "image_size", "mean", "std")

    @property
    def kind(self) -> str:
        return str(self["kind"])

    @property
    def arch(self) -> str:
        return str(self["arch"])

    @property
    def se(self) -> bool:
        return bool(self.get("se"))

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self["classes"]]

    @property
    def image_size(self) -> int:
        return int(self["image_size"])

    @property
    def mean(self) -> list[float]:
        return [float(v) for v in self["mean"]]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in self["std"]]

    @property
    def version(self) -> str | None:
        return self.get("version")

    def transform(self, train: bool = False) -> Any:
        """The preprocessing this model was trained with (augmented with `train`)."""
        from model.data import image_transform

        return image_transform(self.image_size, self.mean, self.std, train=train)

    def updated(self, **changes: Any) -> CheckpointMeta:
        """A copy with `changes` applied."""
        return CheckpointMeta({**self, **changes})


def make_meta(
    kind: str,
    arch: str,
    classes: list[str],
    image_size: int,
    se: bool = False,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    **extra: Any,
) -> CheckpointMeta:
    """The record every checkpoint carries; `extra` holds parent version, settings, metrics."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(KINDS)}")
    return CheckpointMeta(
        kind=kind,
        arch=arch,
        se=se,
        classes=list(classes),
        image_size=int(image_size),
        mean=list(mean),
        std=list(std),
        **extra,
    )


def build_from_meta(meta: CheckpointMeta) -> nn.Module:
    """An untrained network of the shape the record describes."""
    return KINDS[meta.kind](meta.arch, len(meta.classes), se=meta.se)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """A file that appears at `path` complete or not at all (temporary file, rename).

    The file is created readable by its owner only (mkstemp's 0600). `durable` also fsyncs it
    before the rename, so it survives a power cut; a cache that can be refilled may skip that.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write weights and record to `path` atomically; returns the path."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # A plain dict: weights_only loading accepts no classes of ours.
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": dict(meta),
        "state": state,
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    """The record and the raw state dict, checked for format but not built into a model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an {FORMAT} file (a bare state dict or another tool's checkpoint?)"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {payload.get('format_version')}, expected {FORMAT_VERSION}"
        )
    if not isinstance(payload.get("meta"), dict):
        raise CheckpointError(f"{path}: no metadata record")
    meta = CheckpointMeta(payload["meta"])
    missing = [k for k in CheckpointMeta.REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    return meta, payload["state"]


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    expect_kind: str | None = None,
    expect_arch: str | None = None,
    expect_classes: list[str] | None = None,
) -> tuple[nn.Module, CheckpointMeta]:
    """The model in eval mode on `device`, and its record; refuses a checkpoint of another model."""
    meta, state = read_checkpoint(path)
    expected = {"kind": expect_kind, "arch": expect_arch, "classes": expect_classes}
    for key, want in expected.items():
        if want is not None and meta[key] != (list(want) if key == "classes" else want):
            raise CheckpointError(f"{path}: {key} is {meta[key]!r}, expected {want!r}")
    try:
        model = build_from_meta(meta)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        detail = "; ".join(
            f"{label}: {keys[:3]}"
            for label, keys in (
                ("shape differs", mismatched),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if keys
        )
        raise CheckpointError(
            f"{path}: weights do not fit a {meta.kind} {meta.arch} with "
            f"{len(meta.classes)} classes ({detail})"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), meta
