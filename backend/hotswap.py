"""Hot-swap: every serving process follows the registry's current version by itself.

Each serving process polls the registry index from backend/loop.py's maintenance thread (one
``stat`` per interval, a read only when it changed), loads a newly published or rolled-back
version beside the one being served, warms it up, and swaps the served snapshot in one
assignment. Requests in flight finish on the model they started with. Polling needs nothing but
MODEL_DIR, so it works across gunicorn workers and across hosts that mount the same MODEL_DIR,
and keeps working while Redis is down.
"""

from __future__ import annotations

import logging

from backend.registry import ModelRegistry, RegistryError
from backend.serving import ServedModel
from model.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class RegistryWatcher:
    """Keeps a :class:`ServedModel` on the registry's current version."""

    def __init__(self, registry: ModelRegistry, served: ServedModel) -> None:
        self.registry = registry
        self.served = served
        self._seen: tuple[int, int] | None = None
        self.last_error: str | None = None
        self.retired = False  # the registry serves nothing any more (a reset lineage)

    def check(self) -> bool:
        """Swap if the registry names another version; True when a swap happened."""
        stamp = self.registry.stamp()
        if stamp is None or stamp == self._seen:
            return False
        try:
            current = self.registry.current()
            self.retired = current is None
            if current is None or current["version"] == self.served.version:
                self._seen = stamp
                return False
            # The checkpoint's record carries its version, so it is served as current["version"].
            self.served.swap_checkpoint(self.registry.checkpoint_path(current["version"]))
        except (RegistryError, CheckpointError, OSError) as exc:
            self.last_error = str(exc)
            log.error(
                "cannot load the registry's current version, still serving %s: %s",
                self.served.version,
                exc,
            )
            return False
        self._seen = stamp
        self.last_error = None
        return True
