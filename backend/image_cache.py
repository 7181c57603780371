"""Downloaded image bytes on disk, so a new model version does not download them again.

Files are named by a hash of the URL and written atomically. A hit marks the file used (its
modification time); when the bytes this process counts pass ``ABN_IMAGE_CACHE_MAX_BYTES``, the
least recently used files are deleted down to 90 % of it. The cache is scanned once per process
and then at each prune, not on every write; other workers' writes are seen at the next scan.
Label Studio's upload and storage URLs do not change content; a plain URL whose content changes
is served stale.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from contextlib import suppress
from pathlib import Path

from model.checkpoint import atomic_write

log = logging.getLogger(__name__)

_STALE_TEMP_SECONDS = 3600


class ImageCache:
    """Bytes by URL under `directory` (None: no cache), at most `max_bytes` in all."""

    def __init__(self, directory: Path | None, max_bytes: int, max_file_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes  # a bigger file on disk is not served
        self._lock = threading.Lock()
        self._bytes: int | None = None  # this process's count; None until first scanned

    def path(self, url: str) -> Path | None:
        """Where `url`'s bytes are cached (None: the cache is off)."""
        if self.directory is None:
            return None
        digest = hashlib.sha256(url.encode()).hexdigest()
        return self.directory / digest[:2] / digest

    def get(self, url: str) -> bytes | None:
        """The cached bytes of `url`, or None."""
        path = self.path(url)
        if path is None:
            return None
        try:
            if path.stat().st_size > self.max_file_bytes:
                return None
            data = path.read_bytes()
        except OSError:
            return None
        with suppress(OSError):
            os.utime(path)  # recently used: eviction goes by modification time
        return data

    def put(self, url: str, data: bytes) -> None:
        """Cache `data` as `url`'s bytes (not when over the cap by itself)."""
        path = self.path(url)
        if path is None or len(data) > self.max_bytes:
            return
        try:
            with atomic_write(path, durable=False) as f:  # a cache: no fsync on /predict
                f.write(data)
        except OSError as exc:
            log.warning("cannot cache %s in %s: %s", url[:200], path, exc)
            return
        self._count(len(data))

    def _count(self, added: int) -> None:
        """Add `added` bytes to this process's count; prune once it passes the cap.

        The cache is scanned once per process and then at each prune, not on every write;
        other workers' writes are seen at the next scan.
        """
        cap = self.max_bytes
        with self._lock:
            if self._bytes is None:
                self._bytes = self._scan()[1]
            else:
                self._bytes += added
            if self._bytes > cap:
                self._bytes = self._prune(int(cap * 0.9))

    def _scan(self) -> tuple[list[tuple[float, int, str]], int]:
        """(mtime, size, path) of every cached file, and their total size."""
        entries: list[tuple[float, int, str]] = []
        if self.directory is None:
            return entries, 0
        now = time.time()
        try:
            subdirs = [d.path for d in os.scandir(self.directory) if d.is_dir()]
        except OSError:
            return entries, 0
        for sub in subdirs:
            try:
                files = list(os.scandir(sub))
            except OSError:
                continue
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    continue
                if f.name.startswith("."):  # atomic_write's temporary file
                    if now - st.st_mtime > _STALE_TEMP_SECONDS:
                        Path(f.path).unlink(missing_ok=True)
                    continue
                entries.append((st.st_mtime, st.st_size, f.path))
        return entries, sum(size for _, size, _ in entries)

    def _prune(self, target: int) -> int:
        """Delete the least recently used files until the cache holds `target` bytes or less."""
        entries, total = self._scan()
        entries.sort()
        removed = 0
        for _, size, path in entries:
            if total <= target:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot evict %s from the image cache: %s", path, exc)
                continue
            total -= size
            removed += 1
        log.info(
            "image cache: %d files evicted, %d bytes kept (ABN_IMAGE_CACHE_MAX_BYTES)",
            removed,
            total,
        )
        return total
