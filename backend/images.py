"""Loading a task's image from wherever Label Studio keeps it, and from nowhere else.

Task data names the image as Label Studio stores it:

- ``/data/upload/<project>/<file>``, ``/data/local-files/?d=<path>``, ``/storage-data/...``,
  ``/tasks/<id>/resolve/...``: paths on the Label Studio host, fetched with its API token;
- ``s3://``, ``gs://``, ``azure-blob://`` URIs of a project's cloud storage: fetched through
  Label Studio's ``/tasks/<id>/presign/?fileuri=...``, which redirects to a signed URL;
- ``http(s)://`` URLs: fetched only when the host is the Label Studio host or one of
  ``ABN_IMAGE_ALLOWED_HOSTS``. A task is user input: without this rule, anyone who can import
  a task could make the backend request internal addresses (SSRF).

The Label Studio host is ``LABEL_STUDIO_URL`` (with ``LABEL_STUDIO_API_KEY``) when set, else the
``hostname`` and ``access_token`` that the project's ``/setup`` call sent. Which ``/setup``
hostnames are used (:meth:`ProjectConnections.remember`):

- with ``LABEL_STUDIO_URL`` set, it is the host, always: another hostname from /setup is never
  recorded nor used (its token is, when ``LABEL_STUDIO_API_KEY`` is unset);
- else, with ``ABN_IMAGE_ALLOWED_HOSTS`` non-empty, a hostname outside that list is refused at
  /setup (403), and a record on disk outside it is not used: the allow-list bounds every host
  the backend fetches from, the Label Studio host included;
- a project already connected to a host keeps it unless the /setup is authenticated
  (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``): without auth, /setup may connect a project that has
  no host yet, or repeat its host (a token refresh), but not move it to another host (403).

The token goes only to that host, and there only to its file paths: a path must start with
``/data/upload/``, ``/data/local-files/``, ``/storage-data/``, ``/tasks/<id>/resolve``,
``/tasks/<id>/presign`` (or ``/projects/<id>/...`` for the last two), and hold no ``.`` or ``..``
segment and no backslash once percent-decoded (repeatedly). A relative task URL outside these
is refused; an absolute URL on the Label Studio host outside them is fetched without the token.
Redirects are followed by hand, each hop checked: from the Label Studio host only its
resolve/presign endpoints may redirect elsewhere (to a signed cloud URL); any other redirect
must stay on the Label Studio host or go to an allowed host.

Limits, each a setting:

- ``ABN_IMAGE_TIMEOUT``: seconds for the whole download, redirects included. A watchdog shuts
  the connection down at the deadline, so a host that trickles its headers or body a byte at a
  time cannot hold a request longer (each ``recv`` would otherwise restart the socket timeout);
- ``ABN_IMAGE_MAX_BYTES``: the body is streamed and dropped at the limit;
- ``ABN_IMAGE_MAX_PIXELS``: checked from the header, before decoding (decompression bombs);
- ``ABN_IMAGE_DECODE_PIXELS``: pixels being decoded at once in the process, all requests
  together (Pillow holds about 4 bytes a pixel); a decode waits for room up to
  ``ABN_IMAGE_TIMEOUT``. An image over the budget alone is decoded alone;
- once decoded, only a small copy is kept: exactly the model's input size when the caller
  passes it (``size``: the served transform's resize then changes nothing, so predictions are
  those of the full image), else at most ``WORKING_PIXELS``; images over that are first reduced
  (JPEG: decoded at 1/2, 1/4 or 1/8 scale with ``Image.draft``). The original width and height
  are kept: brushes are drawn at that size;
- ``ABN_IMAGE_CACHE_MAX_BYTES``: downloaded bytes are cached on disk under a hash of the URL,
  written atomically, so a second /predict for the same task (a new model version) does not
  download again; a hit marks the file used, and when the bytes this process counts pass the
  cap, the least recently used files are deleted down to 90 % of it. Label Studio's upload and
  storage URLs do not change content; a plain URL whose content changes is served stale.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import heapq
import http.cookiejar
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
from PIL import Image, ImageFile, UnidentifiedImageError

from backend.settings import Settings
from model.checkpoint import atomic_write

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
MAX_REDIRECTS = 5
# The most pixels kept of a decoded image when the caller does not say the model's input size
# (4096 x 4096, 48 MB as RGB); smaller images are kept whole, so their predictions do not change.
WORKING_PIXELS = 4096 * 4096
_TRIM_PIXELS = 2_000_000  # decodes from this size on give their memory back (8 MB and more)
_CHUNK = 64 * 1024
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")
# Label Studio's file paths (label_studio/data_import/urls.py, io_storages/urls.py, 1.23).
_FILE_PATH = re.compile(
    r"^/(?:data/upload/|data/local-files/|storage-data/"
    r"|(?:tasks|projects)/\d+/(?:resolve|presign)(?:/|$))"
)
# The one view that answers with a redirect off the host: a presigned cloud storage URL.
_RESOLVE_PATH = re.compile(r"^/(?:tasks|projects)/\d+/(?:resolve|presign)(?:/|$)")
_STALE_TEMP_SECONDS = 3600
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


class ImageFetchError(ValueError):
    """A task's image could not be used; `reason` is a short tag for logs and metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class HostRefused(ValueError):
    """A /setup hostname the backend will not record; the message names the setting.

    `status`: the HTTP status for the refusal (400 malformed, 403 not allowed).
    """

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LabelStudioConnection:
    """A Label Studio host and the token to use with it."""

    url: str
    token: str | None

    def auth_header(self) -> dict[str, str]:
        """``Token <key>`` for a legacy token, ``Bearer <jwt>`` for a personal access token."""
        if not self.token:
            return {}
        scheme = "Bearer" if _looks_like_jwt(self.token) else "Token"
        return {"Authorization": f"{scheme} {self.token}"}

    def owns(self, url: str) -> bool:
        """Whether `url` is on this host (same scheme, host and port)."""
        return _origin(url) == _origin(self.url)

    def serves_file(self, url: str) -> bool:
        """Whether `url` is one of this host's file paths: the only URLs that get the token."""
        path = self._local_path(url)
        return path is not None and is_file_path(path)

    def resolves(self, url: str) -> bool:
        """Whether `url` is this host's resolve/presign endpoint (may redirect off the host)."""
        path = self._local_path(url)
        return path is not None and is_file_path(path) and bool(_RESOLVE_PATH.match(path))

    def same_host(self, url: str) -> bool:
        """Whether `url` names this Label Studio (origin and base path)."""
        return self.owns(url) and _base_path(url) == _base_path(self.url)

    def _local_path(self, url: str) -> str | None:
        """The path of `url` below this host's base path (Label Studio may live under one)."""
        if not self.owns(url):
            return None
        path = urlsplit(url).path
        base = _base_path(self.url)
        if base:
            if not path.startswith(base + "/"):
                return None
            path = path[len(base) :]
        return path


def is_file_path(path: str) -> bool:
    """Whether `path` is a Label Studio file path that cannot be turned into another one.

    Percent-decoded until stable first (``%252e`` is ``%2e`` is ``.``: a proxy in front of
    Label Studio may decode once more than Django does), then no ``.``/``..`` segment, no
    backslash and no control character, and one of the prefixes of ``_FILE_PATH``.
    """
    decoded = path
    for _ in range(5):
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    else:
        return False
    if "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return False
    if any(segment in (".", "..") for segment in decoded.split("/")):
        return False
    return bool(_FILE_PATH.match(decoded))


class ProjectConnections:
    """The host and token each project's /setup sent, in memory and on disk.

    On disk (one 0600 JSON file per project) because gunicorn runs several workers and
    Label Studio's /setup and /predict may reach different ones. `label_studio_url` and
    `allowed_hosts` are the settings that bound which hosts are recorded (module docstring).
    """

    def __init__(
        self,
        directory: Path | None,
        label_studio_url: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self._known: dict[str, LabelStudioConnection] = {}
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()

    @staticmethod
    def project_key(project: object) -> str | None:
        """``"12.1700000000"`` (id.created_at, as Label Studio sends it) to ``"12"``."""
        if project is None:
            return None
        key = str(project).split(".", 1)[0].strip()
        return _SAFE_KEY.sub("_", key)[:64] or None

    def remember(
        self, project: object, hostname: str, token: str | None, *, authenticated: bool = False
    ) -> None:
        """Store what /setup received; a changed token replaces the old one.

        `authenticated`: whether the /setup came with valid credentials. Without, a project
        already connected to another host is not moved (HostRefused). A hostname outside
        ``ABN_IMAGE_ALLOWED_HOSTS`` (when set) is refused; with ``LABEL_STUDIO_URL`` set, that
        URL is recorded instead of the hostname.
        """
        key = self.project_key(project)
        if key is None:
            return
        url = hostname.strip().rstrip("/")
        try:
            parts = urlsplit(url)
            valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise HostRefused(f"hostname must be an http(s) URL, got {_short(hostname)!r}", 400)
        with self._setup_lock:  # one check-then-write at a time in this process
            self._remember(key, url, token, authenticated)

    def _remember(self, key: str, url: str, token: str | None, authenticated: bool) -> None:
        if self.label_studio_url:
            if not LabelStudioConnection(self.label_studio_url, None).same_host(url):
                log.info(
                    "project %s: /setup hostname %s is not used, LABEL_STUDIO_URL=%s is",
                    key,
                    _short(url),
                    self.label_studio_url,
                )
            url = self.label_studio_url
        else:
            if self.allowed_hosts and not host_allowed(url, self.allowed_hosts):
                raise HostRefused(
                    f"hostname {_short(url)!r} is not in ABN_IMAGE_ALLOWED_HOSTS, so images are "
                    "never fetched from it: add its host there, or set LABEL_STUDIO_URL"
                )
            current = self.get(key)
            if current is not None and not authenticated and not current.same_host(url):
                raise HostRefused(
                    f"project {key} is connected to Label Studio at {current.url}; a /setup "
                    f"without authentication cannot move it to {_short(url)}. Set "
                    "BASIC_AUTH_USER and BASIC_AUTH_PASS (then /setup is authenticated), or "
                    "set LABEL_STUDIO_URL"
                )
        conn = LabelStudioConnection(url, token)
        with self._lock:
            if self._known.get(key) == conn:
                return
            self._known[key] = conn
        if self.directory is not None:
            try:
                # atomic_write creates the file 0600: the token stays the owner's.
                with atomic_write(self.directory / f"{key}.json") as f:
                    f.write(json.dumps({"hostname": conn.url, "access_token": token}).encode())
            except OSError as exc:
                log.warning("cannot persist the connection of project %s: %s", key, exc)

    def get(self, project: object) -> LabelStudioConnection | None:
        key = self.project_key(project)
        if key is None:
            return None
        with self._lock:
            conn = self._known.get(key)
        if conn is None and self.directory is not None:
            try:
                record = json.loads((self.directory / f"{key}.json").read_text())
                conn = LabelStudioConnection(str(record["hostname"]), record.get("access_token"))
            except (OSError, ValueError, KeyError, TypeError):
                return None
            with self._lock:
                self._known[key] = conn
        if conn is None:
            return None
        if (
            not self.label_studio_url
            and self.allowed_hosts
            and not host_allowed(conn.url, self.allowed_hosts)
        ):
            # Recorded before ABN_IMAGE_ALLOWED_HOSTS was set: not a host we may fetch from.
            return None
        return conn


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for the model, with its size as the editor shows it.

    `image` is RGB and may be smaller than `width` x `height` (module docstring): the model
    resizes it anyway, and brushes are drawn at `width` x `height`.
    """

    image: Image.Image
    width: int
    height: int


class ImageLoader:
    """Resolves, fetches (with limits and a cache) and decodes task images."""

    def __init__(self, settings: Settings, connections: ProjectConnections | None = None) -> None:
        self.settings = settings
        self.connections = connections or ProjectConnections(
            settings.projects_dir, settings.label_studio_url, settings.image_allowed_hosts
        )
        self.cache_dir = settings.resolved_image_cache_dir
        self.allowed_hosts = tuple(h.lower() for h in settings.image_allowed_hosts)
        self.working_pixels = WORKING_PIXELS
        self._session = _shared_session()
        self._budget = _decode_budget(settings.image_decode_pixels)
        self._cache_lock = threading.Lock()
        self._cache_bytes: int | None = None  # this process's count; None until first scanned

    # ------------------------------------------------------------------ resolution

    def connection_for(self, project: object = None) -> LabelStudioConnection | None:
        """``LABEL_STUDIO_URL`` (an operator's explicit choice) first, else what /setup sent."""
        from_setup = self.connections.get(project)
        if self.settings.label_studio_url:
            token = self.settings.label_studio_api_key or (from_setup and from_setup.token)
            return LabelStudioConnection(self.settings.label_studio_url, token or None)
        if from_setup is not None and self.allowed_hosts and not self._allowed(from_setup.url):
            return None  # a record from before ABN_IMAGE_ALLOWED_HOSTS was set
        return from_setup

    def resolve(
        self, url: str, project: object = None, task_id: object = None
    ) -> tuple[str, LabelStudioConnection | None]:
        """The absolute URL to fetch, and the Label Studio connection when it is on that host."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("the task has no image URL", "missing")
        url = url.strip()
        conn = self.connection_for(project)
        if url.startswith(("upload/", "/upload/")):
            url = "/data/" + url.lstrip("/")
        if url.startswith(CLOUD_SCHEMES):
            if task_id is None or isinstance(task_id, bool) or not isinstance(task_id, int):
                raise ImageFetchError(
                    f"{_short(url)}: a cloud storage URI needs the task id to be presigned",
                    "missing",
                )
            url = f"/tasks/{task_id}/presign/?fileuri={_b64(url)}"
        if url.startswith("/") and not url.startswith("//"):
            if not is_file_path(urlsplit(url).path):
                raise ImageFetchError(
                    f"{_short(url)}: a relative URL must be a Label Studio file path "
                    "(/data/upload/, /data/local-files/, /storage-data/, /tasks/<id>/resolve, "
                    "/tasks/<id>/presign) with no '..' segment or backslash; not fetched",
                    "disallowed",
                )
            if conn is None:
                raise ImageFetchError(
                    f"{_short(url)} is a Label Studio path, but no Label Studio host is known: "
                    "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or reconnect the model "
                    "so that /setup sends its hostname (one in ABN_IMAGE_ALLOWED_HOSTS when "
                    "that is set)",
                    "disallowed",
                )
            return conn.url + url, conn
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageFetchError(
                f"{_short(url)}: only http(s) URLs and Label Studio paths are fetched "
                f"(scheme {scheme or 'none'!r})",
                "disallowed",
            )
        if conn is not None and conn.owns(url):
            return url, conn
        if self._allowed(url):
            return url, None
        raise ImageFetchError(
            f"{_short(url)}: host {urlsplit(url).netloc!r} is neither the Label Studio host "
            "nor in ABN_IMAGE_ALLOWED_HOSTS, so it is not fetched",
            "disallowed",
        )

    def _allowed(self, url: str) -> bool:
        return host_allowed(url, self.allowed_hosts)

    # ------------------------------------------------------------------ fetching

    def load(
        self, url: str, project: object = None, task_id: object = None, size: int | None = None
    ) -> LoadedImage:
        """The task's image, decoded, EXIF-rotated as browsers show it, in RGB.

        `size`: the model's (square) input side; the image is then kept at exactly that size,
        resized as the served transform does, so the prediction is unchanged.
        """
        target, conn = self.resolve(url, project, task_id)
        data = self._cached(target)
        if data is not None:
            return self.decode(data, _short(url), size)
        data = self._download(target, conn)
        loaded = self.decode(data, _short(url), size)
        self._store(target, data)  # only images that decode: errors are retried next time
        return loaded

    def decode(self, data: bytes, name: str = "image", size: int | None = None) -> LoadedImage:
        """Bytes to an RGB image, refusing non-images and images over the pixel limit.

        Only a bounded copy survives (module docstring); the pixels decoded at once in the
        process are bounded by ``ABN_IMAGE_DECODE_PIXELS``.
        """
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int, got {size!r}")
        limit = self.settings.image_max_pixels
        # The size check reads only the header, before any pixel is decoded. (No
        # warnings.catch_warnings here: it is not thread-safe, and requests run in threads.)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limit:
                raise ImageFetchError(
                    f"{name}: {width}x{height} = {width * height} pixels is over the "
                    f"limit of {limit} (ABN_IMAGE_MAX_PIXELS); refused as a possible "
                    "decompression bomb",
                    "too_many_pixels",
                )
            if width * height > self.working_pixels and img.format in ("JPEG", "MPO"):
                img.draft(None, _draft_request(width, height, self.working_pixels))
            decoded = img.width * img.height
            with self._budget.hold(decoded, self.settings.image_timeout, name):
                img.load()
                try:
                    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                except Exception:  # a broken EXIF block: show the image as stored
                    orientation = 1
                method = _TRANSPOSE.get(orientation)
                if orientation in (5, 6, 7, 8):  # a quarter turn: the editor shows it turned
                    width, height = height, width
                img = _shrink(img, self.working_pixels)
                if method is not None:
                    img = img.transpose(method)
                if img.mode != "RGB" or (size is None and isinstance(img, ImageFile.ImageFile)):
                    img = img.convert("RGB")  # also lets go of the file and its bytes
                if size is not None:
                    # What the served transform (torchvision Resize, PIL bilinear) does.
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
            if decoded >= _TRIM_PIXELS:
                _release_freed_memory()
        except ImageFetchError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageFetchError(
                f"{name}: refused as a decompression bomb ({exc})", "too_many_pixels"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageFetchError(f"{name}: not an image ({len(data)} bytes)", "not_image") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageFetchError(f"{name}: corrupt image ({exc})", "not_image") from exc
        return LoadedImage(img, width, height)

    def _download(self, url: str, conn: LabelStudioConnection | None) -> bytes:
        """GET with manual redirects, each hop checked, streamed up to the byte limit.

        The whole download, redirects included, must end by the ``ABN_IMAGE_TIMEOUT``
        deadline: the watchdog shuts the connection down then, whatever phase it is in.
        """
        deadline = time.monotonic() + self.settings.image_timeout
        alarm = _WATCHDOG.arm(deadline)
        _CURRENT.alarm = alarm
        try:
            return self._follow(url, conn, deadline, alarm)
        except ImageFetchError as exc:
            if alarm.fired and exc.reason != "timeout":
                raise self._timeout(url) from exc
            raise
        finally:
            _CURRENT.alarm = None
            _WATCHDOG.disarm(alarm)

    def _timeout(self, url: str) -> ImageFetchError:
        return ImageFetchError(
            f"{_short(url)}: not downloaded within {self.settings.image_timeout} s "
            "(ABN_IMAGE_TIMEOUT)",
            "timeout",
        )

    def _follow(
        self, url: str, conn: LabelStudioConnection | None, deadline: float, alarm: _Alarm
    ) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(url)
            # The token goes to Label Studio's file paths only: never off the host, and not
            # to its API even when a redirect or an absolute URL points there.
            headers = conn.auth_header() if conn is not None and conn.serves_file(url) else {}
            try:
                response = self._session.get(
                    url,
                    headers=headers,
                    stream=True,
                    timeout=(remaining, remaining),
                    allow_redirects=False,
                )
            except requests.Timeout as exc:
                raise self._timeout(url) from exc
            except requests.RequestException as exc:
                if alarm.fired:
                    raise self._timeout(url) from exc
                raise ImageFetchError(f"{_short(url)}: unreachable ({exc})", "unreachable") from exc
            with response:
                if response.is_redirect:
                    nxt = urljoin(url, response.headers.get("Location", ""))
                    self._check_redirect(url, nxt, conn)
                    url = nxt
                    continue
                self._check_status(response, url)
                return self._read_body(response, url, deadline, alarm)
        raise ImageFetchError(f"{_short(url)}: more than {MAX_REDIRECTS} redirects", "unreachable")

    def _check_redirect(self, url: str, nxt: str, conn: LabelStudioConnection | None) -> None:
        """Refuse a redirect from `url` to `nxt` that the module docstring does not allow."""
        if urlsplit(nxt).scheme.lower() not in ("http", "https"):
            reason = "not http(s)"
        elif conn is not None and conn.owns(nxt):
            return  # on the Label Studio host (the token only to its file paths)
        elif conn is not None and conn.owns(url):
            if conn.resolves(url):
                return  # Label Studio's presign/resolve: a signed cloud storage URL
            reason = "Label Studio redirects off its host only from its resolve/presign endpoints"
        elif self._allowed(nxt):
            return
        else:
            reason = "host not allowed"
        raise ImageFetchError(
            f"{_short(url)}: redirect to {_short(nxt)} is not followed ({reason})", "disallowed"
        )

    @staticmethod
    def _check_status(response: requests.Response, url: str) -> None:
        status = response.status_code
        if status == 404:
            raise ImageFetchError(f"{_short(url)}: not found (HTTP 404)", "missing")
        if status in (401, 403):
            raise ImageFetchError(
                f"{_short(url)}: refused (HTTP {status}); check LABEL_STUDIO_API_KEY or the "
                "token /setup received",
                "refused",
            )
        if not 200 <= status < 300:
            raise ImageFetchError(f"{_short(url)}: HTTP {status}", "http_error")

    def _read_body(
        self, response: requests.Response, url: str, deadline: float, alarm: _Alarm
    ) -> bytes:
        limit = self.settings.image_max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageFetchError(
                f"{_short(url)}: {declared} bytes is over the limit of {limit} "
                "(ABN_IMAGE_MAX_BYTES)",
                "too_large",
            )
        body = bytearray()
        raw = response.raw
        try:
            while True:
                if alarm.fired or time.monotonic() >= deadline:
                    raise self._timeout(url)
                # read1: at most one recv (iter_content's read(n) loops until n bytes came,
                # each recv restarting the socket timeout); decoded output is capped at _CHUNK.
                chunk = raw.read1(_CHUNK, decode_content=True)
                if not chunk:
                    break
                body += chunk
                if len(body) > limit:
                    raise ImageFetchError(
                        f"{_short(url)}: more than {limit} bytes (ABN_IMAGE_MAX_BYTES)",
                        "too_large",
                    )
        except ImageFetchError:
            raise
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            if alarm.fired or isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
                raise self._timeout(url) from exc
            raise ImageFetchError(f"{_short(url)}: download failed ({exc})", "unreachable") from exc
        if alarm.fired:  # the watchdog's shutdown reads as the end of the body
            raise self._timeout(url)
        if not body:
            raise ImageFetchError(f"{_short(url)}: empty response", "not_image")
        return bytes(body)

    # ------------------------------------------------------------------ cache

    def _cache_path(self, url: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(url.encode()).hexdigest()
        return self.cache_dir / digest[:2] / digest

    def _cached(self, url: str) -> bytes | None:
        path = self._cache_path(url)
        if path is None:
            return None
        try:
            if path.stat().st_size > self.settings.image_max_bytes:
                return None
            data = path.read_bytes()
        except OSError:
            return None
        with suppress(OSError):
            os.utime(path)  # recently used: eviction goes by modification time
        return data

    def _store(self, url: str, data: bytes) -> None:
        path = self._cache_path(url)
        if path is None or len(data) > self.settings.image_cache_max_bytes:
            return
        try:
            with atomic_write(path, durable=False) as f:  # a cache: no fsync on /predict
                f.write(data)
        except OSError as exc:
            log.warning("cannot cache %s: %s", _short(url), exc)
            return
        self._count_cached(len(data))

    def _count_cached(self, added: int) -> None:
        """Add `added` bytes to this process's count; prune once it passes the cap.

        The cache is scanned once per process and then at each prune, not on every write;
        other workers' writes are seen at the next scan.
        """
        cap = self.settings.image_cache_max_bytes
        with self._cache_lock:
            if self._cache_bytes is None:
                self._cache_bytes = self._scan_cache()[1]
            else:
                self._cache_bytes += added
            if self._cache_bytes > cap:
                self._cache_bytes = self._prune_cache(int(cap * 0.9))

    def _scan_cache(self) -> tuple[list[tuple[float, int, str]], int]:
        """(mtime, size, path) of every cached file, and their total size."""
        entries: list[tuple[float, int, str]] = []
        if self.cache_dir is None:
            return entries, 0
        now = time.time()
        try:
            subdirs = [d.path for d in os.scandir(self.cache_dir) if d.is_dir()]
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

    def _prune_cache(self, target: int) -> int:
        """Delete the least recently used files until the cache holds `target` bytes or less."""
        entries, total = self._scan_cache()
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


# ---------------------------------------------------------------------- decoding helpers


def _draft_request(width: int, height: int, pixels: int) -> tuple[int, int]:
    """The size to ask ``JpegImageFile.draft`` for: the smallest of the 1/2, 1/4, 1/8 scales
    that decodes `pixels` or fewer (1/8 at most; draft decodes at least the size asked)."""
    scale = 1
    while scale < 8 and width * height > pixels * scale * scale:
        scale *= 2
    return max(1, width // scale), max(1, height // scale)


def _shrink(img: Image.Image, pixels: int) -> Image.Image:
    """`img` reduced by an integer factor (box filter) to at most `pixels`, or `img` itself."""
    width, height = img.size
    if width * height <= pixels:
        return img
    factor = max(2, math.ceil(math.sqrt(width * height / pixels)))
    while math.ceil(width / factor) * math.ceil(height / factor) > pixels:
        factor += 1
    if img.mode in ("1", "P", "I;16", "I;16B", "I;16L", "I;16N"):  # modes reduce() refuses
        img = img.convert("RGB")
    return img.reduce(factor)


def _load_malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own libc
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory() -> None:
    """Give the buffers of a large decode, now freed, back to the system.

    glibc keeps freed memory in per-thread arenas (and raises its mmap threshold after each
    large free), so without this each request thread would keep a decode's worth of RSS:
    8 threads decoding 8000x8000 PNGs held +1.7 GB after the last one was freed, ~0 with it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _PixelBudget:
    """A counting semaphore in pixels: how many may be decoded at once in this process."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, timeout: float, name: str) -> Iterator[None]:
        need = min(max(pixels, 1), self.capacity)  # an image over the budget runs alone
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.in_use + need > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageFetchError(
                        f"{name}: waited {timeout} s for {need} pixels of the decoding budget "
                        f"(ABN_IMAGE_DECODE_PIXELS={self.capacity}, {self.in_use} in use)",
                        "busy",
                    )
                self._cond.wait(left)
            self.in_use += need
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= need
                self._cond.notify_all()


_BUDGETS: dict[int, _PixelBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def _decode_budget(capacity: int) -> _PixelBudget:
    """The process's budget for `capacity` (one per setting value: one in production)."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(capacity)
        if budget is None:
            budget = _BUDGETS[capacity] = _PixelBudget(capacity)
        return budget


# ---------------------------------------------------------------------- the download deadline


class _Alarm:
    """One download's deadline and the sockets (duplicates) to shut down when it passes."""

    __slots__ = ("deadline", "done", "fired", "socks")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.socks: list[socket.socket] = []
        self.fired = False
        self.done = False


class _Watchdog:
    """One thread per process that shuts down the connections of downloads past their deadline.

    A socket timeout bounds one ``recv``, not a download: a host sending a byte a second never
    trips it. Shutting the socket down (through a duplicate descriptor, so that the connection's
    own socket object is never touched from this thread) ends a blocked read in the download's
    thread at once, in any phase: TLS handshake, headers or body.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float) -> _Alarm:
        alarm = _Alarm(deadline)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="abn-image-deadline", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), alarm))
            self._cond.notify()
        return alarm

    def watch(self, alarm: _Alarm, sock: socket.socket) -> None:
        """Shut `sock` down too when `alarm` fires."""
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:
            return
        with self._cond:
            if not alarm.done:
                alarm.socks.append(dup)
                if alarm.fired:
                    _shutdown(dup)
                return
        dup.close()

    def disarm(self, alarm: _Alarm) -> None:
        with self._cond:
            alarm.done = True
            socks, alarm.socks = alarm.socks, []
        for dup in socks:
            dup.close()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                alarm = heapq.heappop(self._heap)[2]
                alarm.fired = True
                for dup in alarm.socks:
                    _shutdown(dup)


def _shutdown(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()
_CURRENT = threading.local()  # .alarm: the download this thread is doing, if any


def _after_fork_in_child() -> None:
    # Locks held by other threads at fork time would stay held forever in the child.
    global _BUDGETS_LOCK
    _WATCHDOG._reset()
    _BUDGETS.clear()
    _BUDGETS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _DeadlineMixin:
    """Puts every socket of a connection under the current download's alarm."""

    sock: Any
    timeout: Any

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        alarm = getattr(_CURRENT, "alarm", None)
        if alarm is not None:
            _WATCHDOG.watch(alarm, sock)  # before the TLS handshake
        return sock

    def getresponse(self) -> Any:
        alarm = getattr(_CURRENT, "alarm", None)
        if alarm is not None and self.sock is not None:
            _WATCHDOG.watch(alarm, self.sock)  # a kept-alive connection, reused
            left = max(alarm.deadline - time.monotonic(), 0.001)
            if isinstance(self.timeout, int | float):
                self.timeout = min(self.timeout, left)
        return super().getresponse()  # type: ignore[misc]


class _HTTPConnection(_DeadlineMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def _shared_session() -> requests.Session:
    """One session for all request threads: kept-alive connections to Label Studio are reused.

    Sharing is safe here because nothing per-request lives in the session: no cookies are
    kept (a cookie from one host must never ride along to another), no environment proxies or
    .netrc credentials are read, and headers are passed per call. urllib3's pool is
    thread-safe.
    """
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = _DeadlineAdapter(pool_connections=8, pool_maxsize=32)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# ---------------------------------------------------------------------- URLs


def host_allowed(url: str, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether `url`'s host matches an ``ABN_IMAGE_ALLOWED_HOSTS`` entry (host[:port], *.dom)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        return False
    for entry in allowed_hosts:
        name, _, want_port = entry.lower().partition(":")
        if want_port and str(port or _default_port(parts.scheme)) != want_port:
            continue
        if name == host or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or _default_port(scheme)


def _base_path(url: str) -> str:
    return urlsplit(url).path.rstrip("/")


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme)


def _looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except ValueError:
        return False
    return isinstance(header, dict) and "alg" in header


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _short(url: str, limit: int = 200) -> str:
    """A URL cut to `limit` characters for messages (task data can hold very long data URLs)."""
    return url if len(url) <= limit else url[: limit - 3] + "..."
