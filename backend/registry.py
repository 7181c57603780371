"""Published model versions under MODEL_DIR: what is served, and where each version came from.

Two kinds of lineage, each a registry of its own:

- the shared model (``v1``, ``v2``, ...): what ``--checkpoint`` or ``--demo`` publishes, served
  to every project whose classes it has and that has no model of its own;
- a project's own model (``p<project>-v1``, ...): the first version trained on its labelled
  tasks, or the first round of its corrections (forked from the shared model), and every round
  after. A round in one project never changes another's predictions.

Version names are unique across lineages (Label Studio's ``GET /versions`` names no project),
and only ever grow within one, a reset included, so Label Studio, seeing a new
``model_version``, asks for fresh predictions.

Layout of one lineage (``backend/layout.py`` has where each lives)::

    versions/v1.pt, v2.pt, ...   checkpoints, each written atomically
    registry.json               {"current": "v2", "versions": [record, ...]}

The index is replaced atomically under a file lock, so every serving process (any number of
gunicorn workers, any host that mounts MODEL_DIR) reads either the old index or the new one.
A version is published only after its checkpoint is complete on disk; a worker killed before
that point leaves nothing visible. Version numbers only ever grow, so Label Studio, seeing a new
``model_version``, asks for fresh predictions.
"""

from __future__ import annotations

import fcntl
import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from backend.layout import ModelDirLayout
from backend.settings import Settings
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


_PROJECT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what ProjectConnections.project_key gives
_VERSION = re.compile(r"^(?:p(?P<project>[A-Za-z0-9_-]{1,64})-)?v(?P<number>[0-9]+)$")


def lineage_of(version: str) -> str | None:
    """The project whose lineage a version name belongs to (None: the shared model's).

    Raises :class:`RegistryError` for a name no registry gives.
    """
    match = _VERSION.match(version)
    if match is None:
        raise RegistryError(f"{version!r} is not a version name (v3, p12-v3)")
    return match["project"]


def version_number(version: str | None) -> int:
    """The number of a version name, 0 for anything else (a plain checkpoint's digest name)."""
    match = _VERSION.match(version or "")
    return int(match["number"]) if match else 0


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never a mix."""
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)


class ModelRegistry:
    """The versions of one lineage, kept as files so that no other service is needed.

    `project` None is the shared model; a project key is that project's own model.
    """

    def __init__(self, model_dir: str | Path, project: str | None = None) -> None:
        if project is not None and not _PROJECT.match(project):
            raise RegistryError(f"{project!r} is not a project key (letters, digits, _ and -)")
        self.root = Path(model_dir)
        self.project = project
        top = ModelDirLayout(self.root)
        self.layout = top if project is None else top.lineage(project)
        self.versions_dir = self.layout.versions
        self.index_path = self.layout.registry_index
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def of_version(cls, model_dir: str | Path, version: str) -> ModelRegistry:
        """The registry that names `version` (its name says which lineage)."""
        return cls(model_dir, lineage_of(version))

    @staticmethod
    def projects(model_dir: str | Path) -> list[str]:
        """The projects that have a lineage of their own."""
        lineages = ModelDirLayout(Path(model_dir)).lineages
        if not lineages.is_dir():
            return []
        return sorted(p.name for p in lineages.iterdir() if (p / "registry.json").is_file())

    def version_name(self, number: int) -> str:
        return f"v{number}" if self.project is None else f"p{self.project}-v{number}"

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
        # A fork continues its parent's numbering: p3-v2 is the first round on shared v1.
        number = 1 + max(
            [version_number(r["version"]) for r in index["versions"]]
            + [version_number(meta.get("parent_version"))]
        )
        version = self.version_name(number)
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

    def reset(self, reason: str) -> dict[str, Any] | None:
        """Serve nothing from this lineage any more (its versions stay listed, and numbering
        goes on): how a project whose classes changed starts a new lineage. Returns the record
        that was current."""
        with self._locked():
            index = self._read()
            old = self._record(index, index["current"]) if index["current"] else None
            index["current"] = None
            index.setdefault("resets", []).append(
                {"at": time.time(), "reason": reason, "was": old and old["version"]}
            )
            write_json_atomically(self.index_path, index)
            return old

    def rollback(self, version: str) -> dict[str, Any]:
        """Serve an earlier (or any published) version again; its checkpoint must still load."""
        with self._locked():
            index = self._read()
            record = self._record(index, version)
            read_checkpoint(self.checkpoint_path(version))
            index["current"] = version
            write_json_atomically(self.index_path, index)
            return record


def shared_model_path(settings: Settings) -> Path | None:
    """The shared model to serve: the registry's current version if MODEL_DIR has published
    one, else ``--checkpoint`` (``ABN_CHECKPOINT``), else None (every project then needs a model
    of its own). Following later publications while running is the hot-swap's job."""
    if settings.layout.registry_index.is_file():
        published = ModelRegistry(settings.model_dir).current_checkpoint()
        if published is not None:
            return published
    return settings.checkpoint


@dataclass(frozen=True)
class Lineage:
    """What one lineage serves now, as far as choosing it for a project goes."""

    version: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Answering:
    """Which lineage answers a project: its own, the shared model, or none, and why none."""

    chosen: Lineage | None
    own: bool  # the project's own lineage (False: the shared model, or none)
    reason: str | None = None  # why none answers

    @property
    def version(self) -> str | None:
        return self.chosen.version if self.chosen else None


def choose_answering(
    project: str | None,
    own: Lineage | None,
    shared: Lineage | None,
    classes: Sequence[str] | None,
) -> Answering:
    """The one rule for which model answers `project` (serving and rounds both ask it).

    Its own lineage once it has one; else the shared model if that has exactly the project's
    `classes` (None: not known, e.g. a /predict without a label config, and the shared model
    answers); else none: the project needs a first model of its own. An own model whose
    classes differ from the config's still answers: refusing that config is the caller's part
    (it says what changed).
    """
    if own is not None:
        return Answering(own, own=True)
    if shared is not None and (classes is None or set(classes) == set(shared.classes)):
        return Answering(shared, own=False)
    why = f"project {project} has no model yet"
    if shared is not None and classes:
        why += (
            f" (its classes {', '.join(classes)} are not those of the shared model "
            f"{shared.version}: {', '.join(shared.classes)})"
        )
    return Answering(None, own=False, reason=why)


def current_lineage(registry: ModelRegistry) -> Lineage | None:
    """The lineage's current version and classes, read from its index (None: it serves none)."""
    if not registry.index_path.is_file():
        return None
    current = registry.current()
    if current is None:
        return None
    return Lineage(current["version"], tuple(current.get("classes") or ()))


def answering(model_dir: str | Path, project: str, classes: Sequence[str] | None) -> Answering:
    """:func:`choose_answering` over what MODEL_DIR has published now."""
    return choose_answering(
        project,
        current_lineage(ModelRegistry(model_dir, project)),
        current_lineage(ModelRegistry(model_dir)),
        classes,
    )


def all_versions(model_dir: str | Path) -> list[dict[str, Any]]:
    """Every published version of every lineage, the shared model's first, each record with
    ``current`` (whether its lineage serves it now)."""
    registries = [ModelRegistry(model_dir)] + [
        ModelRegistry(model_dir, p) for p in ModelRegistry.projects(model_dir)
    ]
    records = []
    for registry in registries:
        current = registry.current()
        for record in registry.versions():
            is_current = current is not None and record["version"] == current["version"]
            records.append({**record, "current": is_current})
    return records
