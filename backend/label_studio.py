"""Label Studio as the backend knows it: a host, a token, and each project's connection.

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

The token goes only to that host, and there only to its file paths (:func:`is_file_path`):
``/data/upload/``, ``/data/local-files/``, ``/storage-data/``, ``/tasks/<id>/resolve``,
``/tasks/<id>/presign`` (or ``/projects/<id>/...`` for the last two), with no ``.`` or ``..``
segment and no backslash once percent-decoded (repeatedly).

:class:`WebhookAuthorizer` uses the same connection to add the backend's basic-auth header to
the project webhook Label Studio creates for it (Label Studio sends webhooks without auth).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from model.checkpoint import atomic_write
from model.errors import UserError

log = logging.getLogger(__name__)

_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")
# Label Studio's file paths (label_studio/data_import/urls.py, io_storages/urls.py, 1.23).
_FILE_PATH = re.compile(
    r"^/(?:data/upload/|data/local-files/|storage-data/"
    r"|(?:tasks|projects)/\d+/(?:resolve|presign)(?:/|$))"
)
# The one view that answers with a redirect off the host: a presigned cloud storage URL.
_RESOLVE_PATH = re.compile(r"^/(?:tasks|projects)/\d+/(?:resolve|presign)(?:/|$)")


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
        url = hostname.strip().rstrip("/")
        try:
            parts = urlsplit(url)
            valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise HostRefused(f"hostname must be an http(s) URL, got {short_url(hostname)!r}", 400)
        key = self.project_key(project)
        if key is None:
            return
        with self._setup_lock:  # one check-then-write at a time in this process
            self._remember(key, url, token, authenticated)

    def _remember(self, key: str, url: str, token: str | None, authenticated: bool) -> None:
        if self.label_studio_url:
            if not LabelStudioConnection(self.label_studio_url, None).same_host(url):
                log.info(
                    "project %s: /setup hostname %s is not used, LABEL_STUDIO_URL=%s is",
                    key,
                    short_url(url),
                    self.label_studio_url,
                )
            url = self.label_studio_url
        else:
            if self.allowed_hosts and not host_allowed(url, self.allowed_hosts):
                raise HostRefused(
                    f"hostname {short_url(url)!r} is not in ABN_IMAGE_ALLOWED_HOSTS, so images are "
                    "never fetched from it: add its host there, or set LABEL_STUDIO_URL"
                )
            current = self.get(key)
            if current is not None and not authenticated and not current.same_host(url):
                raise HostRefused(
                    f"project {key} is connected to Label Studio at {current.url}; a /setup "
                    f"without authentication cannot move it to {short_url(url)}. Set "
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


def short_url(url: str, limit: int = 200) -> str:
    """A URL cut to `limit` characters for messages (task data can hold very long data URLs)."""
    return url if len(url) <= limit else url[: limit - 3] + "..."


class WebhookAuthorizer:
    """Adds the backend's basic-auth header to the project webhook Label Studio made for it.

    Label Studio creates the webhook ``<backend url>/webhook`` only after the connection's
    first /setup succeeds, and sends it without auth; so this polls for it in a background
    thread (the /setup reply must not wait) and patches its headers once.
    """

    def __init__(self, header: str, attempts: int = 20, delay: float = 1.5) -> None:
        self.header = header
        self.attempts = attempts
        self.delay = delay
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def ensure(self, conn: LabelStudioConnection, project_id: str, webhook_url: str) -> None:
        """Start the background fix for this project and URL, once per process."""
        key = (conn.url, project_id, webhook_url)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        threading.Thread(
            target=self._run, args=(conn, project_id, webhook_url, key), daemon=True
        ).start()

    def _run(
        self, conn: LabelStudioConnection, project_id: str, url: str, key: tuple[str, str, str]
    ) -> None:
        try:
            for _ in range(self.attempts):
                if self.authorize(conn, project_id, url):
                    return
                time.sleep(self.delay)
            log.warning(
                "no webhook %s found in project %s: add the header Authorization: Basic ... "
                "to it by hand (label_config/README.md)",
                url,
                project_id,
            )
        except Exception as exc:
            log.warning("cannot add auth to the webhook of project %s: %s", project_id, exc)
        with self._lock:  # let a later /setup try again
            self._seen.discard(key)

    def authorize(self, conn: LabelStudioConnection, project_id: str, url: str) -> bool:
        """Patch the webhook whose URL is `url`; True when it is done (or already was)."""
        headers = {**conn.auth_header(), "Content-Type": "application/json"}
        listing = requests.get(
            f"{conn.url}/api/webhooks/", params={"project": project_id}, headers=headers, timeout=5
        )
        listing.raise_for_status()
        hooks = listing.json()
        if isinstance(hooks, dict):
            hooks = hooks.get("results", [])
        want = url.rstrip("/")
        done = False
        for hook in hooks:
            if not isinstance(hook, dict) or str(hook.get("url", "")).rstrip("/") != want:
                continue
            current = hook.get("headers") or {}
            if current.get("Authorization") != self.header:
                patched = requests.patch(
                    f"{conn.url}/api/webhooks/{hook['id']}/",
                    headers=headers,
                    data=json.dumps({"headers": {**current, "Authorization": self.header}}),
                    timeout=5,
                )
                patched.raise_for_status()
                log.info("added basic auth to webhook %s of project %s", want, project_id)
            done = True
        return done


def basic_header(user: str, password: str) -> str:
    """The ``Authorization`` value of HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class LabelStudioAPIError(UserError, RuntimeError):
    """Label Studio refused a call, or could not be reached; the message says which and why.

    `status`: the HTTP status Label Studio answered (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LabelStudioAPI:
    """The few REST calls the commands make (export, tabs), with one token, and errors that
    say what to do."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        self.conn = LabelStudioConnection(url.rstrip("/"), token)
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update(self.conn.auth_header())

    def call(self, method: str, path: str, **kwargs: object) -> object:
        """JSON of ``method path``; a :class:`LabelStudioAPIError` for anything else."""
        url = f"{self.conn.url}{path}"
        try:
            reply = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioAPIError(f"cannot reach Label Studio at {url}: {exc}") from exc
        if reply.status_code in (401, 403):
            raise LabelStudioAPIError(
                f"Label Studio refused {url} (HTTP {reply.status_code}): pass --token or set "
                "LABEL_STUDIO_API_KEY to a token of a member of the project",
                reply.status_code,
            )
        if not reply.ok:
            raise LabelStudioAPIError(
                f"Label Studio answered {method} {url} with HTTP {reply.status_code}: "
                f"{reply.text[:300]}",
                reply.status_code,
            )
        if not reply.content:
            return None
        try:
            return reply.json()
        except ValueError as exc:
            raise LabelStudioAPIError(f"{url} did not answer JSON") from exc

    def tasks(self, project: int) -> list[dict]:
        """Every task of `project`, with its annotations and predictions."""
        out: list[dict] = []
        page = 1
        while True:
            try:
                reply = self.call(
                    "GET",
                    "/api/tasks/",
                    params={"project": project, "page": page, "page_size": 100, "fields": "all"},
                )
            except LabelStudioAPIError as exc:
                if exc.status == 404 and page > 1:  # past the last full page
                    return out
                raise
            batch = reply.get("tasks", []) if isinstance(reply, dict) else []
            out.extend(t for t in batch if isinstance(t, dict))
            if len(batch) < 100:
                return out
            page += 1
