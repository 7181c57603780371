"""Published model versions under MODEL_DIR: what is served, and where each version came from.

Layout::

    MODEL_DIR/versions/v1.pt, v2.pt, ...   checkpoints, each written atomically
    MODEL_DIR/registry.json               {"current": "v2", "versions": [record, ...]}

The index is replaced atomically under a file lock, so every serving process (any number of
gunicorn workers, any host that mounts MODEL_DIR) reads either the old index or the new one.
A version is published only after its checkpoint is complete on disk; a worker killed before
that point leaves nothing visible. Version numbers only ever grow, so Label Studio, seeing a new
``model_version``, asks for fresh predictions.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from backend.layout import ModelDirLayout
from backend.settings import Settings, SettingsError
from model.checkpoint import (
    CheckpointMeta,
    atomic_write,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from model.errors import UserError


class RegistryError(UserError, ValueError):
    """A version that does not exist, or a registry that cannot be read."""


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never a mix."""
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)


class ModelRegistry:
    """The versions of one deployment, kept as files so that no other service is needed."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir)
        self.layout = ModelDirLayout(self.root)
        self.versions_dir = self.layout.versions
        self.index_path = self.layout.registry_index
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.layout.registry_lock, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        if not self.index_path.is_file():
            return {"current": None, "versions": []}
        try:
            return json.loads(self.index_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{self.index_path}: unreadable registry ({exc})") from exc

    def versions(self) -> list[dict[str, Any]]:
        """Every published version, oldest first."""
        return self._read()["versions"]

    def current(self) -> dict[str, Any] | None:
        """The record of the served version, or None before anything is published."""
        index = self._read()
        return self._record(index, index["current"]) if index["current"] else None

    def stamp(self) -> tuple[int, int] | None:
        """A cheap change detector for pollers: the index file's mtime and size."""
        try:
            st = self.index_path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def checkpoint_path(self, version: str) -> Path:
        return self.layout.checkpoint(version)

    def current_checkpoint(self) -> Path | None:
        """The served version's checkpoint, or None before anything is published."""
        current = self.current()
        return None if current is None else self.checkpoint_path(current["version"])

    @staticmethod
    def _record(index: dict[str, Any], version: str) -> dict[str, Any]:
        for record in index["versions"]:
            if record["version"] == version:
                return record
        known = ", ".join(r["version"] for r in index["versions"]) or "none"
        raise RegistryError(f"no published version {version!r} (published: {known})")

    def publish(self, model: nn.Module, meta: CheckpointMeta, **record: Any) -> dict[str, Any]:
        """Write a new version's checkpoint, then make it current; returns its record.

        `record` carries the lineage: parent version, annotation ids, settings, gate metrics.
        """
        with self._locked():
            return self._publish(model, meta, record)

    def _publish(
        self, model: nn.Module, meta: CheckpointMeta, record: dict[str, Any]
    ) -> dict[str, Any]:
        """:meth:`publish` for a caller that holds the lock."""
        index = self._read()
        number = 1 + max((int(r["version"][1:]) for r in index["versions"]), default=0)
        version = f"v{number}"
        path = self.checkpoint_path(version)
        save_checkpoint(path, model, meta.updated(version=version))
        entry = {
            "version": version,
            "path": str(path.relative_to(self.root)),
            "published_at": time.time(),
            "parent_version": meta.get("parent_version"),
            "arch": meta["arch"],
            "classes": meta["classes"],
            **record,
        }
        index["versions"].append(entry)
        index["current"] = version
        write_json_atomically(self.index_path, index)
        return entry

    def publish_file(self, checkpoint: str | Path, **record: Any) -> dict[str, Any]:
        """Publish an existing checkpoint file as a new version (for scripts and tests; a first
        start uses :meth:`publish_initial`)."""
        with self._locked():
            return self._publish_file(checkpoint, record)

    def publish_initial(self, checkpoint: str | Path) -> tuple[dict[str, Any], bool]:
        """The current version's record, publishing `checkpoint` first if nothing is published.

        The second value says whether this call published it. The check and the publication
        happen under one lock, so processes starting together publish one version, not several.
        """
        with self._locked():
            current = self.current()
            if current is not None:
                return current, False
            return self._publish_file(checkpoint, {"reason": "initial model"}), True

    def _publish_file(self, checkpoint: str | Path, record: dict[str, Any]) -> dict[str, Any]:
        """:meth:`publish_file` for a caller that holds the lock."""
        model, meta = load_checkpoint(checkpoint)
        return self._publish(model, meta, {"source": str(checkpoint), **record})

    def rollback(self, version: str) -> dict[str, Any]:
        """Serve an earlier (or any published) version again; its checkpoint must still load."""
        with self._locked():
            index = self._read()
            record = self._record(index, version)
            read_checkpoint(self.checkpoint_path(version))
            index["current"] = version
            write_json_atomically(self.index_path, index)
            return record


def model_to_serve(settings: Settings) -> Path:
    """The registry's current version if MODEL_DIR has published one, else the checkpoint.

    ``--checkpoint`` (``ABN_CHECKPOINT``) is the model served while MODEL_DIR holds no
    published version. (Following later publications while running is the hot-swap's job:
    :meth:`ServedModel.swap`.)
    """
    if settings.layout.registry_index.is_file():
        published = ModelRegistry(settings.model_dir).current_checkpoint()
        if published is not None:
            return published
    if settings.checkpoint is None:
        raise SettingsError(
            f"no model to serve: {settings.model_dir} has no published version; "
            "pass --checkpoint CKPT or set ABN_CHECKPOINT"
        )
    return settings.checkpoint
