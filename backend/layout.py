"""MODEL_DIR's layout, spelled out once.

::

    MODEL_DIR/registry.json            the shared model's versions (v1, v2, ...) and current one
    MODEL_DIR/registry.lock            serialises publications and rollbacks
    MODEL_DIR/versions/vN.pt           each version's checkpoint
    MODEL_DIR/lineages/<project>/      one project's own model: registry.json, registry.lock and
                                       versions/p<project>-vN.pt, laid out as above
    MODEL_DIR/corrections.sqlite3      corrections, which version predicted each task, requests
    MODEL_DIR/jobs/<project>.json      the last training job's outcome, per project
    MODEL_DIR/projects/<project>.json  the Label Studio host and token /setup sent (0600)
    MODEL_DIR/rounds/<project>/        active-learning rounds: round-<k>.json each
    MODEL_DIR/cache/images/            downloaded task images (ABN_IMAGE_CACHE_DIR moves it)
    MODEL_DIR/metrics/gunicorn-<pid>/  Prometheus values shared by one server's workers
    MODEL_DIR/default-decoy-digits.pt  the demo model `abn run` trains when given none

Every process that shares MODEL_DIR (gunicorn workers, RQ workers, hosts with one volume) finds
the same files through this one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelDirLayout:
    """The paths under one MODEL_DIR."""

    root: Path

    def lineage(self, project: str) -> ModelDirLayout:
        """The layout of one project's own model, under ``lineages/<project>``."""
        return ModelDirLayout(self.lineages / project)

    @property
    def lineages(self) -> Path:
        return self.root / "lineages"

    @property
    def registry_index(self) -> Path:
        return self.root / "registry.json"

    @property
    def registry_lock(self) -> Path:
        return self.root / "registry.lock"

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    def checkpoint(self, version: str) -> Path:
        return self.versions / f"{version}.pt"

    @property
    def corrections_db(self) -> Path:
        return self.root / "corrections.sqlite3"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job_result(self, project: str) -> Path:
        return self.jobs / f"{project}.json"

    @property
    def projects(self) -> Path:
        return self.root / "projects"

    def rounds(self, project: str) -> Path:
        return self.root / "rounds" / project

    @property
    def image_cache(self) -> Path:
        return self.root / "cache" / "images"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def demo_checkpoint(self) -> Path:
        return self.root / "default-decoy-digits.pt"
