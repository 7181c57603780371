"""``abn serve``: the backend under gunicorn, started safely.

Gunicorn's master forks its workers, and a master that has run torch hangs its workers in
OpenMP (``backend/isolation.py``). So the master does what must happen once before the fork
(publish the first model, check the one to serve) in a fresh interpreter, and each worker loads
the model itself, after the fork, in its own app (``backend/app.py``). With several workers,
Prometheus values go through a folder under MODEL_DIR so that /metrics sums all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from backend import prometheus
from backend.isolation import run_in_fresh_process
from backend.registry import ModelRegistry, shared_model_path
from backend.settings import Settings, SettingsError
from model.checkpoint import read_checkpoint

log = logging.getLogger(__name__)


def prepare_to_serve(settings: Settings) -> Path | None:
    """Publish the checkpoint on a first start, and check the shared model to serve, once
    (None: there is none; each project then trains its own).

    Run by :func:`serve` in a fresh process before gunicorn forks; failing here, once, is
    clearer than failing in every worker.
    """
    if settings.checkpoint is not None:
        record, published = ModelRegistry(settings.model_dir).publish_initial(settings.checkpoint)
        if published:
            log.info("published %s as %s", settings.checkpoint, record["version"])
    source = shared_model_path(settings)
    if source is None:
        return None
    meta, _ = read_checkpoint(source)
    if meta.get("kind") != "abn":
        raise SettingsError(f"{source} is a {meta.get('kind')!r} checkpoint; serving needs an ABN")
    return source


def serve(
    host: str = "127.0.0.1",
    port: int = 9090,
    checkpoint: str | Path | None = None,
    workers: int = 1,
    *,
    threads: int = 4,
    timeout: int = 300,
    settings: Settings | None = None,
) -> None:
    """Run the backend under gunicorn (``abn serve``); blocks until gunicorn exits.

    Each worker builds its own app, so the model is loaded once per worker process, after the
    fork (no torch state is shared across a fork). With several workers, Prometheus metrics go
    through a multiprocess folder so that /metrics sums all workers.
    """
    settings = settings or Settings.from_env()
    if checkpoint is not None:
        settings = settings.replace(checkpoint=Path(checkpoint))
    settings.check_exposure(host)
    # This process forks the workers, so it must not run torch itself (backend/isolation.py).
    source = run_in_fresh_process(prepare_to_serve, settings)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )

    workers = max(1, int(workers))
    metrics_dir = None
    if workers > 1 and not prometheus.multiprocess_dir():
        # Under MODEL_DIR, not /tmp: a master killed with SIGKILL cannot remove its folder, so
        # the next start removes the folders of masters that are gone.
        metrics_dir = prometheus.make_multiprocess_dir(settings.layout.metrics)
        prometheus.enable_multiprocess(str(metrics_dir))
    torch_threads = max(1, (os.cpu_count() or 1) // workers)

    def post_fork(server: Any, worker: Any) -> None:
        import torch

        torch.set_num_threads(torch_threads)

    def on_exit(server: Any) -> None:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = {
        "bind": bind,
        "workers": workers,
        "worker_class": "gthread",
        "threads": max(1, int(threads)),
        "timeout": timeout,
        "graceful_timeout": 30,
        "post_fork": post_fork,
        "on_exit": on_exit,
    }

    class _Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            from backend.app import create_app  # in the worker, after the fork

            return create_app(settings)

    log.info(
        "serving %s on %s with %d worker(s)",
        source or "no shared model (each project trains its own)",
        bind,
        workers,
    )
    _Application().run()
