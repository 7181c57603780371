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
``hostname`` and ``access_token`` that the project's ``/setup`` call sent. The token goes only to
that host, never to another one, redirects included.

Limits: ``ABN_IMAGE_MAX_BYTES`` (the body is streamed and dropped at the limit),
``ABN_IMAGE_MAX_PIXELS`` (checked from the header, before decoding: decompression bombs) and
``ABN_IMAGE_TIMEOUT`` (per request and for the whole download). Downloaded bytes are cached on
disk under a hash of the URL, written atomically, so a second /predict for the same task (a new
model version) does not download again. Label Studio's upload and storage URLs do not change
content; a plain URL whose content changes would be served stale from the cache.
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import io
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.settings import Settings
from model.checkpoint import atomic_write

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")


class ImageFetchError(ValueError):
    """A task's image could not be used; `reason` is a short tag for logs and metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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


class ProjectConnections:
    """The host and token each project's /setup sent, in memory and on disk.

    On disk (one 0600 JSON file per project) because gunicorn runs several workers and
    Label Studio's /setup and /predict may reach different ones.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._known: dict[str, LabelStudioConnection] = {}
        self._lock = threading.Lock()

    @staticmethod
    def project_key(project: object) -> str | None:
        """``"12.1700000000"`` (id.created_at, as Label Studio sends it) to ``"12"``."""
        if project is None:
            return None
        key = str(project).split(".", 1)[0].strip()
        return _SAFE_KEY.sub("_", key)[:64] or None

    def remember(self, project: object, hostname: str, token: str | None) -> None:
        """Store what /setup received; a changed token replaces the old one."""
        key = self.project_key(project)
        if key is None:
            return
        conn = LabelStudioConnection(hostname.rstrip("/"), token)
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
            if key in self._known:
                return self._known[key]
        if self.directory is None:
            return None
        try:
            record = json.loads((self.directory / f"{key}.json").read_text())
            conn = LabelStudioConnection(str(record["hostname"]), record.get("access_token"))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        with self._lock:
            self._known[key] = conn
        return conn


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for the model, with its size as the editor shows it."""

    image: Image.Image
    width: int
    height: int


class ImageLoader:
    """Resolves, fetches (with limits and a cache) and decodes task images."""

    def __init__(self, settings: Settings, connections: ProjectConnections | None = None) -> None:
        self.settings = settings
        self.connections = connections or ProjectConnections(settings.projects_dir)
        self.cache_dir = settings.resolved_image_cache_dir
        self.allowed_hosts = tuple(h.lower() for h in settings.image_allowed_hosts)
        self._session = _shared_session()

    # ------------------------------------------------------------------ resolution

    def connection_for(self, project: object = None) -> LabelStudioConnection | None:
        """``LABEL_STUDIO_URL`` (an operator's explicit choice) first, else what /setup sent."""
        from_setup = self.connections.get(project)
        if self.settings.label_studio_url:
            token = self.settings.label_studio_api_key or (from_setup and from_setup.token)
            return LabelStudioConnection(self.settings.label_studio_url, token or None)
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
            if conn is None:
                raise ImageFetchError(
                    f"{_short(url)} is a Label Studio path, but no Label Studio host is known: "
                    "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or reconnect the model "
                    "so that /setup sends its hostname",
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
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        try:
            port = parts.port
        except ValueError:
            return False
        for entry in self.allowed_hosts:
            name, _, want_port = entry.partition(":")
            if want_port and str(port or _default_port(parts.scheme)) != want_port:
                continue
            if name == host or (name.startswith("*.") and host.endswith(name[1:])):
                return True
        return False

    # ------------------------------------------------------------------ fetching

    def load(self, url: str, project: object = None, task_id: object = None) -> LoadedImage:
        """The task's image, decoded, EXIF-rotated as browsers show it, in RGB."""
        target, conn = self.resolve(url, project, task_id)
        data = self._cached(target)
        if data is not None:
            return self.decode(data, _short(url))
        data = self._download(target, conn)
        loaded = self.decode(data, _short(url))
        self._store(target, data)  # only images that decode: errors are retried next time
        return loaded

    def decode(self, data: bytes, name: str = "image") -> LoadedImage:
        """Bytes to an RGB image, refusing non-images and images over the pixel limit."""
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
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
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
        return LoadedImage(rgb, rgb.width, rgb.height)

    def _download(self, url: str, conn: LabelStudioConnection | None) -> bytes:
        """GET with manual redirects, each hop checked, streamed up to the byte limit."""
        timeout = self.settings.image_timeout
        deadline = time.monotonic() + timeout
        from_label_studio = conn is not None
        for _ in range(MAX_REDIRECTS + 1):
            headers = conn.auth_header() if conn is not None and conn.owns(url) else {}
            try:
                response = self._session.get(
                    url,
                    headers=headers,
                    stream=True,
                    timeout=(timeout, timeout),
                    allow_redirects=False,
                )
            except requests.Timeout as exc:
                raise ImageFetchError(
                    f"{_short(url)}: timed out after {timeout} s", "timeout"
                ) from exc
            except requests.RequestException as exc:
                raise ImageFetchError(f"{_short(url)}: unreachable ({exc})", "unreachable") from exc
            with response:
                if response.is_redirect:
                    location = response.headers.get("Location", "")
                    nxt = urljoin(url, location)
                    # Label Studio's own redirects (presigned cloud URLs) may leave its host;
                    # anyone else's must stay on hosts we may fetch from.
                    if urlsplit(nxt).scheme not in ("http", "https") or not (
                        from_label_studio
                        or self._allowed(nxt)
                        or (conn is not None and conn.owns(nxt))
                    ):
                        raise ImageFetchError(
                            f"{_short(url)}: redirect to {_short(nxt)} is not followed "
                            "(host not allowed)",
                            "disallowed",
                        )
                    from_label_studio = conn is not None and conn.owns(nxt)
                    url = nxt
                    continue
                self._check_status(response, url)
                return self._read_body(response, url, deadline)
        raise ImageFetchError(f"{_short(url)}: more than {MAX_REDIRECTS} redirects", "unreachable")

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

    def _read_body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        limit = self.settings.image_max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageFetchError(
                f"{_short(url)}: {declared} bytes is over the limit of {limit} "
                "(ABN_IMAGE_MAX_BYTES)",
                "too_large",
            )
        body = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise ImageFetchError(
                        f"{_short(url)}: more than {limit} bytes (ABN_IMAGE_MAX_BYTES)",
                        "too_large",
                    )
                if time.monotonic() > deadline:
                    raise ImageFetchError(
                        f"{_short(url)}: download took longer than {self.settings.image_timeout} s",
                        "timeout",
                    )
        except requests.RequestException as exc:
            kind = "timeout" if isinstance(exc, requests.Timeout) else "unreachable"
            raise ImageFetchError(f"{_short(url)}: download failed ({exc})", kind) from exc
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
            return path.read_bytes()
        except OSError:
            return None

    def _store(self, url: str, data: bytes) -> None:
        path = self._cache_path(url)
        if path is None:
            return
        try:
            with atomic_write(path, durable=False) as f:  # a cache: no fsync on /predict
                f.write(data)
        except OSError as exc:
            log.warning("cannot cache %s: %s", _short(url), exc)


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
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=32)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or _default_port(scheme)


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
