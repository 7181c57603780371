"""Loading a task's image from wherever Label Studio keeps it, and from nowhere else.

Task data names the image as Label Studio stores it:

- ``/data/upload/<project>/<file>``, ``/data/local-files/?d=<path>``, ``/storage-data/...``,
  ``/tasks/<id>/resolve/...``: paths on the Label Studio host, fetched with its API token;
- ``s3://``, ``gs://``, ``azure-blob://`` URIs of a project's cloud storage: fetched through
  Label Studio's ``/tasks/<id>/presign/?fileuri=...``, which redirects to a signed URL;
- ``http(s)://`` URLs: fetched only when the host is the Label Studio host or one of
  ``ABN_IMAGE_ALLOWED_HOSTS``. A task is user input: without this rule, anyone who can import
  a task could make the backend request internal addresses (SSRF).

Which host is the Label Studio host, and which of its paths get the token, is
``backend/label_studio.py``'s business. A relative task URL outside Label Studio's file paths is
refused; an absolute URL on the Label Studio host outside them is fetched without the token.
Redirects are followed by hand, each hop checked: from the Label Studio host only its
resolve/presign endpoints may redirect elsewhere (to a signed cloud URL); any other redirect
must stay on the Label Studio host or go to an allowed host.

Limits, each a setting: ``ABN_IMAGE_TIMEOUT`` (the whole download, redirects included, under a
deadline that holds: ``backend/deadline.py``), ``ABN_IMAGE_MAX_BYTES`` (the body is streamed and
dropped at the limit), the pixel limits of ``backend/image_decoder.py``, and the cache's cap
(``backend/image_cache.py``).
"""

from __future__ import annotations

import base64
import logging
import time
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from backend.deadline import CURRENT, WATCHDOG, Alarm, deadline_session
from backend.image_cache import ImageCache
from backend.image_decoder import ImageDecoder, ImageFetchError, LoadedImage
from backend.label_studio import (
    LabelStudioConnection,
    ProjectConnections,
    host_allowed,
    is_file_path,
    short_url,
)
from backend.settings import Settings

__all__ = ["ImageFetchError", "ImageLoader", "LoadedImage"]

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


class ImageLoader:
    """Resolves, fetches (with limits and a cache) and decodes task images."""

    def __init__(self, settings: Settings, connections: ProjectConnections | None = None) -> None:
        self.settings = settings
        self.connections = connections or ProjectConnections(
            settings.projects_dir, settings.label_studio_url, settings.image_allowed_hosts
        )
        self.allowed_hosts = tuple(h.lower() for h in settings.image_allowed_hosts)
        self.cache = ImageCache(
            settings.resolved_image_cache_dir,
            settings.image_cache_max_bytes,
            settings.image_max_bytes,
        )
        self.decoder = ImageDecoder(
            settings.image_max_pixels, settings.image_decode_pixels, settings.image_timeout
        )
        self._session = deadline_session()

    # ------------------------------------------------------------------ resolution

    def connection_for(self, project: object = None) -> LabelStudioConnection | None:
        """``LABEL_STUDIO_URL`` (an operator's explicit choice) first, else what /setup sent."""
        from_setup = self.connections.get(project)
        if self.settings.label_studio_url:
            token = self.settings.label_studio_api_key or (from_setup and from_setup.token)
            return LabelStudioConnection(self.settings.label_studio_url, token or None)
        return from_setup  # None for a host outside ABN_IMAGE_ALLOWED_HOSTS (label_studio.py)

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
                    f"{short_url(url)}: a cloud storage URI needs the task id to be presigned",
                    "missing",
                )
            url = f"/tasks/{task_id}/presign/?fileuri={_b64(url)}"
        if url.startswith("/") and not url.startswith("//"):
            if not is_file_path(urlsplit(url).path):
                raise ImageFetchError(
                    f"{short_url(url)}: a relative URL must be a Label Studio file path "
                    "(/data/upload/, /data/local-files/, /storage-data/, /tasks/<id>/resolve, "
                    "/tasks/<id>/presign) with no '..' segment or backslash; not fetched",
                    "disallowed",
                )
            if conn is None:
                raise ImageFetchError(
                    f"{short_url(url)} is a Label Studio path, but no Label Studio host is known: "
                    "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or reconnect the model "
                    "so that /setup sends its hostname (one in ABN_IMAGE_ALLOWED_HOSTS when "
                    "that is set)",
                    "disallowed",
                )
            return conn.url + url, conn
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageFetchError(
                f"{short_url(url)}: only http(s) URLs and Label Studio paths are fetched "
                f"(scheme {scheme or 'none'!r})",
                "disallowed",
            )
        if conn is not None and conn.owns(url):
            return url, conn
        if self._allowed(url):
            return url, None
        raise ImageFetchError(
            f"{short_url(url)}: host {urlsplit(url).netloc!r} is neither the Label Studio host "
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
        data = self.cache.get(target)
        if data is not None:
            return self.decoder.decode(data, short_url(url), size)
        data = self._download(target, conn)
        loaded = self.decoder.decode(data, short_url(url), size)
        self.cache.put(target, data)  # only images that decode: errors are retried next time
        return loaded

    def _download(self, url: str, conn: LabelStudioConnection | None) -> bytes:
        """GET with manual redirects, each hop checked, streamed up to the byte limit.

        The whole download, redirects included, must end by the ``ABN_IMAGE_TIMEOUT``
        deadline: the watchdog shuts the connection down then, whatever phase it is in.
        """
        deadline = time.monotonic() + self.settings.image_timeout
        alarm = WATCHDOG.arm(deadline)
        CURRENT.alarm = alarm
        try:
            return self._follow(url, conn, deadline, alarm)
        except ImageFetchError as exc:
            if alarm.fired and exc.reason != "timeout":
                raise self._timeout(url) from exc
            raise
        finally:
            CURRENT.alarm = None
            WATCHDOG.disarm(alarm)

    def _timeout(self, url: str) -> ImageFetchError:
        return ImageFetchError(
            f"{short_url(url)}: not downloaded within {self.settings.image_timeout} s "
            "(ABN_IMAGE_TIMEOUT)",
            "timeout",
        )

    def _follow(
        self, url: str, conn: LabelStudioConnection | None, deadline: float, alarm: Alarm
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
                raise ImageFetchError(
                    f"{short_url(url)}: unreachable ({exc})", "unreachable"
                ) from exc
            with response:
                if response.is_redirect:
                    nxt = urljoin(url, response.headers.get("Location", ""))
                    self._check_redirect(url, nxt, conn)
                    url = nxt
                    continue
                self._check_status(response, url)
                return self._read_body(response, url, deadline, alarm)
        raise ImageFetchError(
            f"{short_url(url)}: more than {MAX_REDIRECTS} redirects", "unreachable"
        )

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
            f"{short_url(url)}: redirect to {short_url(nxt)} is not followed ({reason})",
            "disallowed",
        )

    @staticmethod
    def _check_status(response: requests.Response, url: str) -> None:
        status = response.status_code
        if status == 404:
            raise ImageFetchError(f"{short_url(url)}: not found (HTTP 404)", "missing")
        if status in (401, 403):
            raise ImageFetchError(
                f"{short_url(url)}: refused (HTTP {status}); check LABEL_STUDIO_API_KEY or the "
                "token /setup received",
                "refused",
            )
        if not 200 <= status < 300:
            raise ImageFetchError(f"{short_url(url)}: HTTP {status}", "http_error")

    def _read_body(
        self, response: requests.Response, url: str, deadline: float, alarm: Alarm
    ) -> bytes:
        limit = self.settings.image_max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageFetchError(
                f"{short_url(url)}: {declared} bytes is over the limit of {limit} "
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
                        f"{short_url(url)}: more than {limit} bytes (ABN_IMAGE_MAX_BYTES)",
                        "too_large",
                    )
        except ImageFetchError:
            raise
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            if alarm.fired or isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
                raise self._timeout(url) from exc
            raise ImageFetchError(
                f"{short_url(url)}: download failed ({exc})", "unreachable"
            ) from exc
        if alarm.fired:  # the watchdog's shutdown reads as the end of the body
            raise self._timeout(url)
        if not body:
            raise ImageFetchError(f"{short_url(url)}: empty response", "not_image")
        return bytes(body)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()
