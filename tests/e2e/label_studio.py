"""A real Label Studio server for end-to-end tests.

The ML backend is only worth what the real server does with it: which calls it makes, with which
bodies, auth and timeouts. Mocks would encode our assumptions, so the e2e tests start the real
``label-studio`` (pinned in ``requirements-label-studio.txt``, installed by ``make test`` into
``.venv-ls``) and drive it over its REST API.

The server must never outlive the tests: it runs in its own process group, is killed with that
group on ``stop()``, at interpreter exit, on SIGTERM/SIGHUP, and (Linux) by the kernel when the
process that started it dies, even by SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import requests

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO_ROOT / ".venv-ls" / "bin" / "label-studio"
ADMIN_EMAIL = "admin@example.com"

# Inherited variables that label_studio reads (it looks up NAME, LABEL_STUDIO_NAME and
# HEARTEX_NAME), which would silently change the server under test: e.g. a HOST in the
# environment rewrites every URL it hands out, PORT/USERNAME/PASSWORD override the CLI defaults.
_SCRUBBED_ENV = frozenset(
    {
        "HOST",
        "PORT",
        "USERNAME",
        "PASSWORD",
        "USER_TOKEN",
        "DEBUG",
        "LOG_LEVEL",
        "DJANGO_DB",
        "DATABASE_NAME",
        "DJANGO_SETTINGS_MODULE",
        "BASE_DATA_DIR",
    }
)

# Offline, quiet and permissive enough to reach a backend on 127.0.0.1.
_SERVER_ENV = {
    "COLLECT_ANALYTICS": "false",  # no usage analytics
    "LATEST_VERSION_CHECK": "false",  # no pypi.org version lookup
    "SENTRY_DSN": "",  # the OSS settings default to HumanSignal's Sentry
    "FRONTEND_SENTRY_DSN": "",
    "FEATURE_FLAGS_OFFLINE": "true",
    "ML_BLOCK_LOCAL_IP": "false",  # else ML backends on loopback are refused
    "SSRF_PROTECTION_ENABLED": "false",  # else webhooks to loopback are refused
    "LOCAL_FILES_SERVING_ENABLED": "true",
    "LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",  # so the log file is current when we show its tail
}

_PR_SET_PDEATHSIG = 1
_prctl: Any = None
if sys.platform.startswith("linux"):  # resolved here: the forked child should only call it
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel to SIGKILL it when the parent dies, so not even
    a SIGKILLed pytest leaves a server behind (the server is one process: Django's
    ``runserver --noreload``). Linux ties this to the *thread* that started it: start servers
    from the main thread (pytest fixtures do)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


_TMP_PREFIX = "ls-e2e-"


def _sweep_stale_dirs() -> None:
    """Delete data dirs left by test runs that were SIGKILLed (their server died with them,
    via PDEATHSIG, but nobody could remove the files); the owner's pid is in the name."""
    for d in Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*-*"):
        try:
            owner = int(d.name[len(_TMP_PREFIX) :].split("-", 1)[0])
            os.kill(owner, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            logger.info("removing %s, left by dead process %d", d, owner)
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            continue


def _free_port() -> int:
    """A port nobody listens on right now (if another process takes it before the server binds
    it, `start` fails fast: see ``_port_taken``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabelStudioError(RuntimeError):
    """The server could not be started, or an API call failed."""


class LabelStudioServer:
    """A Label Studio server in a fresh data directory, for the duration of a ``with`` block.

    ``url``, ``token`` (the admin's legacy token, sent as ``Authorization: Token <token>``) and
    ``document_root`` (where local-files storages must live) describe it; the helper methods are
    thin wrappers over the REST endpoints the e2e tests need.
    """

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float = 180.0,
        extra_env: dict[str, str] | None = None,
        request_timeout: float = 120.0,
    ) -> None:
        self.binary = Path(binary or os.environ.get("LABEL_STUDIO_BIN") or DEFAULT_BINARY)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.request_timeout = request_timeout
        self.port = 0
        self.url = ""
        self.token = secrets.token_hex(20)
        self.password = secrets.token_urlsafe(16)
        self.email = ADMIN_EMAIL
        self._tmp: Path | None = None
        self.data_dir = Path()
        self.document_root = Path()
        self.log_path = Path()
        self._log_file: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {self.token}"
        self.startup_seconds = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start the server and wait until it answers as ours (health, then our token)."""
        if self._proc is not None:
            raise LabelStudioError("already started")
        if not (self.binary.is_file() and os.access(self.binary, os.X_OK)):
            raise LabelStudioError(
                f"Label Studio binary not found at {self.binary} (set LABEL_STUDIO_BIN, or run "
                "`make test`, which installs it into .venv-ls)"
            )
        _sweep_stale_dirs()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
        self.data_dir = self._tmp / "data"
        self.document_root = self._tmp / "files"
        self.data_dir.mkdir()
        self.document_root.mkdir()
        self.log_path = self.data_dir / "label-studio.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED_ENV and not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))
        }
        env.update(_SERVER_ENV)
        env["LOCAL_FILES_DOCUMENT_ROOT"] = str(self.document_root)
        env.update(self.extra_env)
        cmd = [
            str(self.binary),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--username",
            self.email,
            "--password",
            self.password,
            "--user-token",
            self.token,
            "--enable-legacy-api-token",
        ]
        logger.info("starting Label Studio on %s (data in %s)", self.url, self.data_dir)
        self._log_file = self.log_path.open("wb")
        t0 = time.monotonic()
        _register(self)
        self._proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self._tmp,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg reaches all of it
            preexec_fn=_die_with_parent,
        )
        self._wait_ready(t0)
        self.startup_seconds = time.monotonic() - t0
        logger.info("Label Studio ready on %s after %.1f s", self.url, self.startup_seconds)
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        deadline = t0 + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise LabelStudioError(
                    f"Label Studio exited with code {code} during start-up\n{self.log_tail()}"
                )
            if self._port_taken():
                raise LabelStudioError(
                    f"port {self.port} was taken before Label Studio bound it, and it moved to "
                    f"another port: retry\n{self.log_tail()}"
                )
            try:
                r = requests.get(f"{self.url}/health/", timeout=2)
                last = f"/health/ answered {r.status_code}"
                if r.status_code == 200:
                    # Our random token proves it is our server, not one that held the port.
                    who = self.session.get(f"{self.url}/api/current-user/whoami", timeout=5)
                    if who.status_code == 200 and who.json().get("email") == self.email:
                        return
                    raise LabelStudioError(
                        f"{self.url} is up but does not accept our token "
                        f"({who.status_code}): another server holds the port?\n{self.log_tail()}"
                    )
            except requests.RequestException as e:
                last = f"{type(e).__name__}"
            time.sleep(0.5)
        raise LabelStudioError(
            f"Label Studio not ready on {self.url} after {self.startup_timeout:.0f} s "
            f"({last})\n{self.log_tail()}"
        )

    def _port_taken(self) -> bool:
        """label-studio silently tries port+1, +2, ... when its port is busy ("Port P is in
        use"), which would leave us polling the wrong port."""
        try:
            return f"Port {self.port} is in use" in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server's whole process group, wait for it, and delete its files.

        Idempotent and safe to call from atexit or a signal handler; if interrupted (a second
        Ctrl-C), the server stays registered, so the atexit hook finishes the job."""
        if self._proc is not None:
            _terminate_group(self._proc)
            self._proc = None
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
        self.session.close()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _unregister(self)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 60) -> str:
        """The end of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    # -- REST ----------------------------------------------------------------------------------

    def api(self, method: str, path: str, *, expect: Iterable[int] = (), **kw: Any) -> Any:
        """One authenticated API call; raises with the reply body on an unexpected status."""
        kw.setdefault("timeout", self.request_timeout)
        r = self.session.request(method, f"{self.url}{path}", **kw)
        ok = r.status_code in set(expect) if expect else r.ok
        if not ok:
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def create_project(self, title: str, label_config: str, **extra: Any) -> dict[str, Any]:
        return self.api(
            "POST", "/api/projects", json={"title": title, "label_config": label_config, **extra}
        )

    def upload_image(self, project_id: int, path: str | os.PathLike[str]) -> list[int]:
        """Multipart import; the task's image becomes ``/data/upload/<project>/<hash>-<name>``."""
        p = Path(path)
        with p.open("rb") as f:
            reply = self.api(
                "POST",
                f"/api/projects/{project_id}/import",
                params={"return_task_ids": "true"},
                files={p.name: (p.name, f)},
            )
        return list(reply.get("task_ids") or [])

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """JSON import, e.g. ``[{"image": "..."}]`` or ``[{"data": {...}, "predictions": []}]``."""
        reply = self.api(
            "POST",
            f"/api/projects/{project_id}/import",
            params={"return_task_ids": "true"},
            json=tasks,
        )
        return list(reply.get("task_ids") or [])

    def add_local_storage(
        self, project_id: int, subdir: str, regex: str = r".*", *, sync: bool = True
    ) -> dict[str, Any]:
        """A local-files storage over ``document_root/subdir`` (tasks get
        ``/data/local-files/?d=<subdir>/<file>``), synced unless ``sync=False``."""
        path = self.document_root / subdir
        storage = self.api(
            "POST",
            "/api/storages/localfiles",
            json={
                "project": project_id,
                "path": str(path),
                "regex_filter": regex,
                "use_blob_urls": True,
                "title": subdir,
            },
        )
        if sync:
            storage = self.sync_local_storage(storage["id"])
        return storage

    def sync_local_storage(self, storage_id: int) -> dict[str, Any]:
        return self.api("POST", f"/api/storages/localfiles/{storage_id}/sync")

    def connect_ml_backend(
        self,
        project_id: int,
        url: str,
        title: str = "ml backend",
        *,
        basic_auth: tuple[str, str] | None = None,
        is_interactive: bool = False,
    ) -> dict[str, Any]:
        """``POST /api/ml``: the server checks ``/health`` and ``/setup`` before it answers, and
        adds the project webhook ``<url>/webhook``."""
        body: dict[str, Any] = {
            "project": project_id,
            "url": url,
            "title": title,
            "is_interactive": is_interactive,
        }
        if basic_auth is not None:
            body |= {
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": basic_auth[0],
                "basic_auth_pass": basic_auth[1],
            }
        return self.api("POST", "/api/ml", json=body)

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        return self.api("GET", "/api/ml", params={"project": project_id})

    def project_webhooks(self, project_id: int) -> list[dict[str, Any]]:
        return self.api("GET", "/api/webhooks/", params={"project": project_id})

    def set_webhook_headers(self, webhook_id: int, headers: dict[str, str]) -> dict[str, Any]:
        """Webhooks go out without the backend's basic auth; headers are how they get it."""
        return self.api("PATCH", f"/api/webhooks/{webhook_id}/", json={"headers": headers})

    def retrieve_predictions(
        self, project_id: int, task_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """The Data Manager action "Retrieve predictions": the server calls the backend's
        ``/predict`` synchronously for the selected (default: all) tasks."""
        selected: dict[str, Any] = (
            {"all": True} if task_ids is None else {"all": False, "included": task_ids}
        )
        return self.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": selected},
        )

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.api("GET", "/api/predictions/", params={"task": task_id})

    def drafts(self, task_id: int) -> list[dict[str, Any]]:
        """The API user's drafts of a task: what the editor autosaved, as Label Studio keeps it."""
        return self.api("GET", f"/api/tasks/{task_id}/drafts")

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        """Sends ANNOTATION_CREATED to the project webhooks before it returns."""
        return self.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})

    def update_annotation(self, annotation_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        """Sends ANNOTATION_UPDATED."""
        return self.api("PATCH", f"/api/annotations/{annotation_id}/", json={"result": result})

    def delete_annotation(self, annotation_id: int) -> None:
        """Sends ANNOTATIONS_DELETED (plural)."""
        self.api("DELETE", f"/api/annotations/{annotation_id}/")

    def train(self, ml_id: int) -> Any:
        """``POST /api/ml/{id}/train``: START_TRAINING to ``<backend>/webhook``, with basic auth."""
        return self.api("POST", f"/api/ml/{ml_id}/train", json={})

    def interactive_annotating(
        self, ml_id: int, task_id: int, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """What the editor's smart tools do (backend connected with ``is_interactive``): one
        ``/predict`` for one task with ``params.context``; the reply is ``{"data": <result>}``."""
        return self.api(
            "POST",
            f"/api/ml/{ml_id}/interactive-annotating",
            json={"task": task_id, "context": context or {}},
        )

    def tasks(self, project_id: int, *, resolve_uri: bool = False) -> list[dict[str, Any]]:
        """All tasks of a project with annotations and predictions, as stored
        (``resolve_uri=False``) or as the labeling UI gets them."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            reply = self.api(
                "GET",
                "/api/tasks/",
                params={
                    "project": project_id,
                    "page": page,
                    "page_size": 100,
                    "fields": "all",
                    "resolve_uri": str(resolve_uri).lower(),
                },
                expect=(200, 404),
            )
            batch = (reply or {}).get("tasks") or []
            out.extend(batch)
            if len(batch) < 100:
                return out
            page += 1


# -- process cleanup -------------------------------------------------------------------------


def _terminate_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    pgid = proc.pid  # the child called setsid(), so its pid is its group id
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure nothing else of its group lingers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        return
    logger.error("Label Studio (pid %s) did not die", proc.pid)


_live: set[LabelStudioServer] = set()
_live_lock = threading.Lock()
_handlers_installed = False
_previous: dict[int, Any] = {}


def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop the servers, then do what the signal would have done."""
    _stop_all()
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _register(server: LabelStudioServer) -> None:
    global _handlers_installed
    with _live_lock:
        _live.add(server)
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(_stop_all)
    # Ctrl-C is a KeyboardInterrupt, which unwinds through `with`/fixtures; SIGTERM and SIGHUP
    # would end the interpreter without atexit, so they get a handler (main thread only).
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            _previous[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_signal)


def _unregister(server: LabelStudioServer) -> None:
    with _live_lock:
        _live.discard(server)


__all__ = [
    "ADMIN_EMAIL",
    "DEFAULT_BINARY",
    "LabelStudioError",
    "LabelStudioServer",
]
