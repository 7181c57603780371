"""Which model answers for which project, in one serving process.

A project is served its own model (``ModelRegistry(model_dir, project)``) once it has one, else
the shared model (``--checkpoint`` or ``--demo``) if that model has the project's classes, else
nothing: a new project has no model until its first version is trained on its labelled tasks,
and its predictions are empty, with the reason, rather than an error. The project's label
config is the source of truth for its classes.

Project models are loaded on first use and kept up to date by the same registry polling as the
shared one (``backend/hotswap.py``); at most ``ABN_MAX_PROJECT_MODELS`` stay loaded, the least
recently used unloaded first.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from backend.hotswap import RegistryWatcher
from backend.label_config import (
    LabelConfigError,
    Targets,
    check_config,
    config_classes,
    default_targets,
    targets_for,
)
from backend.layout import ModelDirLayout
from backend.registry import Lineage, ModelRegistry, choose_answering
from backend.serving import ServedModel, Snapshot
from backend.settings import Settings
from model.maps import map_size_for

log = logging.getLogger(__name__)


def untrained_version(project: str | None) -> str:
    """The ``model_version`` of a project with no model: it never names a published version."""
    return f"p{project}-untrained" if project else "untrained"


@dataclass(frozen=True)
class ProjectModel:
    """What answers for one project now: a snapshot and where results go, or why nothing does."""

    project: str | None
    snapshot: Snapshot | None
    targets: Targets | None  # None: no label config and no model to derive one from
    own: bool = False  # the project's own lineage (False: the shared model, or none)
    reason: str | None = None  # why there is no model

    @property
    def version(self) -> str:
        return self.snapshot.version if self.snapshot else untrained_version(self.project)


class ProjectModels:
    """The shared model and the loaded project models of one serving process."""

    def __init__(self, settings: Settings, shared: ServedModel | None) -> None:
        self.settings = settings
        self.layout = ModelDirLayout(settings.model_dir)
        self.shared_registry = ModelRegistry(settings.model_dir)
        self.shared: RegistryWatcher | None = (
            RegistryWatcher(self.shared_registry, shared) if shared is not None else None
        )
        self._own: OrderedDict[str, RegistryWatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def shared_model(self) -> ServedModel | None:
        return self.shared.served if self.shared else None

    def own_model(self, project: str) -> ServedModel | None:
        """The project's own current version, loaded on first use; None if it has none."""
        with self._lock:
            watcher = self._own.get(project)
            if watcher is not None:
                self._own.move_to_end(project)
                return watcher.served
        if not self.layout.lineage(project).registry_index.is_file():
            return None  # one stat: a project without a lineage costs nothing more
        registry = ModelRegistry(self.settings.model_dir, project)
        path = registry.current_checkpoint()
        if path is None:
            return None
        served = ServedModel.from_checkpoint(
            path, device=self.settings.device, batch_size=self.settings.batch_size
        )
        with self._lock:
            watcher = self._own.setdefault(project, RegistryWatcher(registry, served))
            self._own.move_to_end(project)
            while len(self._own) > self.settings.max_project_models:
                evicted, _ = self._own.popitem(last=False)
                log.info("unloaded the model of project %s (ABN_MAX_PROJECT_MODELS)", evicted)
            return watcher.served

    def resolve(self, project: str | None, config: str | None) -> ProjectModel:
        """The model for `project` and where its results go in `config` (the project's label
        config, as Label Studio sends it; None: the model's own generated config). Which model
        is the registry's one rule (``backend/registry.py``'s ``choose_answering``).

        Raises :class:`LabelConfigError` for a config no model can answer: a broken one, or one
        whose classes differ from those of the project's own model.
        """
        other = self.settings.other_choices
        own = self.own_model(project) if project is not None else None
        if own is not None:
            snap: Snapshot | None = own.snapshot  # one read per request
            shared = None
        else:
            snap = None
            shared = self.shared_model.snapshot if self.shared_model is not None else None
        classes = config_classes(config, other) if config and snap is None else None
        answer = choose_answering(project, lineage(snap), lineage(shared), classes)
        if answer.own and snap is not None:
            try:
                targets = (
                    check_config(config, snap.classes, other)
                    if config
                    else default_targets(snap.classes)
                )
            except LabelConfigError as exc:
                raise LabelConfigError(changed_classes(project, snap, config, other, exc)) from exc
            return ProjectModel(project, snap, targets, own=True)
        if answer.chosen is not None and shared is not None:
            targets = (
                check_config(config, shared.classes, other)
                if config
                else default_targets(shared.classes)
            )
            return ProjectModel(project, shared, targets)
        reason = no_model_reason(answer.reason or f"project {project} has no model yet")
        targets = targets_for(config, classes, other) if config and classes is not None else None
        return ProjectModel(project, None, targets, reason=reason)

    def map_size(self, resolved: ProjectModel) -> int:
        """The map side a correction is stored at: the model's, or the first model's to come."""
        size = resolved.snapshot.meta.image_size if resolved.snapshot else None
        return map_size_for(size or self.settings.first_image_size)

    def check(self) -> None:
        """One round of hot-swap: every loaded model follows its registry."""
        if self.shared is not None:
            self.shared.check()
        elif self.shared_registry.stamp() is not None:
            path = self.shared_registry.current_checkpoint()
            if path is not None:  # a shared model published after this process started
                served = ServedModel.from_checkpoint(
                    path, device=self.settings.device, batch_size=self.settings.batch_size
                )
                self.shared = RegistryWatcher(self.shared_registry, served)
        with self._lock:
            watchers = list(self._own.items())
        for project, watcher in watchers:
            watcher.check()
            if watcher.retired:
                with self._lock:
                    self._own.pop(project, None)
                log.info("project %s: its lineage was reset; its model is unloaded", project)

    def swap_errors(self) -> dict[str, str]:
        """Versions that failed to load, by lineage ("shared" or the project)."""
        watchers = [("shared", self.shared)] if self.shared else []
        with self._lock:
            watchers += list(self._own.items())
        return {name: w.last_error for name, w in watchers if w is not None and w.last_error}

    def loaded(self) -> dict[str, str]:
        """The version each loaded project model serves."""
        with self._lock:
            return {project: w.served.version for project, w in self._own.items()}

    def info(self) -> dict[str, Any] | None:
        return self.shared.served.info() if self.shared else None


def lineage(snap: Snapshot | None) -> Lineage | None:
    """A loaded model as the registry's rule sees it."""
    return Lineage(snap.version, tuple(snap.classes)) if snap is not None else None


def no_model_reason(why: str) -> str:
    """Why a project gets empty predictions (the registry's reason), and what makes its first
    model."""
    return (
        why + ": label some tasks of each class, then press Start Training (Settings > Model) "
        "to train its first version"
    )


def changed_classes(
    project: str | None,
    snap: Snapshot,
    config: str | None,
    other: tuple[str, ...],
    error: LabelConfigError,
) -> str:
    """The refusal of a label config whose classes are no longer the project model's."""
    try:
        now = config_classes(config or "", other)
    except LabelConfigError:
        return str(error)
    added = [c for c in now if c not in snap.classes]
    removed = [c for c in snap.classes if c not in now]
    change = "; ".join(
        part
        for part in (
            f"added {', '.join(added)}" if added else "",
            f"removed {', '.join(removed)}" if removed else "",
        )
        if part
    )
    return (
        f"project {project}'s model {snap.version} knows the classes {', '.join(snap.classes)}; "
        f"the label config now has {', '.join(now)} ({change}). A version cannot learn other "
        f"classes: put the old classes back, or start a new lineage with "
        f"`abn reset --project {project}` (its versions stay listed for rollback) and train "
        "its first version on the new classes"
    )
