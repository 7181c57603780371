"""Reading request bodies and writing error replies, the same way for every route.

A body is read whole (a chunked body over ``ABN_MAX_REQUEST_BYTES`` is a 413, not a cut body),
parsed as a JSON object, and checked against its model in ``backend/schemas.py`` before a
handler reads it. Every error reply is JSON whose message is repeated in the HTTP reason phrase:
that phrase is the only part of an error Label Studio shows its user.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flask import Response, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from backend.schemas import Body, BodyError, check, json_type


class RequestError(ValueError):
    """A request the backend refuses with a 400 and this message."""


def error_reply(status: int, message: str) -> Response:
    """A JSON error whose HTTP reason phrase repeats the message (Label Studio shows only that)."""
    response = jsonify(error=message, status=status)
    reason = re.sub(r"[^\x20-\x7e]", "?", message)[:300]
    response.status = f"{status} {reason}" if reason else str(status)
    return response


def read_body() -> bytes | bytearray:
    """The whole body, however it is framed, or a 413 when it is over the limit.

    With a Content-Length, werkzeug refuses a body over the limit before reading it. A chunked
    body has no length: werkzeug reads it up to the limit and silently stops there, so the cut
    body looked like malformed JSON (a 400). Here one byte more than the limit is asked for, and
    getting it is the 413 it should be.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None or "wsgi.input_terminated" not in request.environ:
        return request.get_data(cache=False)
    stream = request.environ["wsgi.input"]
    body = bytearray()
    while len(body) <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > limit:
        raise RequestEntityTooLarge()
    return body


_READ_CHUNK = 1 << 16


def json_object() -> dict[str, Any]:
    """The body as a JSON object, or a RequestError that says what is wrong with it."""
    raw = read_body()
    if not raw:
        raise RequestError("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {json_type(body)}")
    if _MAYBE_SURROGATE.search(raw):
        _refuse_lone_surrogates(body)
    return body


# A "\ud800"-style escape, or the UTF-8 bytes of a surrogate (json.loads decodes bytes with
# "surrogatepass"): either can put a lone surrogate into a string, which no UTF-8 consumer
# (SQLite, a URL, a log file) accepts. Only bodies that may hold one are checked in full.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            "the body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its "
            "pair): send valid Unicode text"
        ) from None


def parse_body(model: type[Body]) -> dict[str, Any]:
    """The body as a JSON object of the shape `model` declares (``backend/schemas.py``)."""
    body = json_object()
    check_body(model, body)
    return body


def check_body(model: type[Body], body: dict[str, Any]) -> None:
    """A RequestError naming the first field of `body` that does not fit `model`."""
    try:
        check(model, body)
    except BodyError as exc:
        raise RequestError(str(exc)) from None


class PathScrubber:
    """Paths as replies show them: relative to MODEL_DIR, or only the file name.

    Absolute paths say how the host is laid out (user names, mount points) to anyone who can
    call /status or /rollback, and help no caller.
    """

    _PART = r"[^\s/'\"()\[\]{}<>,;:]+"  # one path component
    _ABSOLUTE = re.compile(rf"(?<![\w/.:~-])/(?:{_PART}/)+({_PART})")

    def __init__(self, model_dir: Path) -> None:
        forms = {str(model_dir), str(model_dir.absolute()), str(model_dir.resolve())}
        self.prefixes = sorted((f.rstrip("/") + "/" for f in forms if f not in ("", ".")), key=len)
        self.prefixes.reverse()  # longest first

    def scrub(self, value: Any) -> Any:
        """`value` with every path in its strings made relative (JSON values: dicts, lists)."""
        if isinstance(value, str):
            for prefix in self.prefixes:
                value = value.replace(prefix, "")
            return self._ABSOLUTE.sub(r"\1", value)
        if isinstance(value, dict):
            return {key: self.scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(item) for item in value]
        return value
