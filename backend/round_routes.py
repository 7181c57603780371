"""Active-learning rounds over HTTP, behind the backend's auth (``backend/rounds.py`` does it).

- ``POST /rounds`` ``{"project": 12, "strategy": "least-confident", "size": 20}``: makes a round
  (a Label Studio tab of the tasks to correct); answers 201 with its record;
- ``GET /rounds?project=12``: the project's rounds as recorded; ``&refresh=1`` reads their
  outcome again first (Label Studio's annotations, the training since).

Refusals say why: a body or query that is not what is declared (400), an unknown strategy (400),
a project with no model, nothing to offer or a round already being made (409), no Label Studio
host known for the project (409), a project Label Studio does not have (404), Label Studio
unreachable or refusing (502).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated

from flask import Blueprint, Response, jsonify, request
from pydantic import Field

from backend.label_studio import LabelStudioAPI, LabelStudioAPIError
from backend.request_io import RequestError, error_reply, parse_body
from backend.rounds import RoundError, RoundRecord, make_round, read_rounds, refresh_rounds
from backend.schemas import MAX_ID, Body, Describe
from backend.services import services
from model.selection import STRATEGIES, SelectionError

log = logging.getLogger(__name__)

rounds = Blueprint("rounds", __name__)

MAX_ROUND = 1000  # the tab is read back in one page of this many tasks


class RoundBody(Body):
    project: Annotated[int, Field(ge=0, le=MAX_ID), Describe(f"an integer in 0..{MAX_ID}")]
    strategy: Annotated[
        str, Field(min_length=1, max_length=100), Describe("a strategy: " + ", ".join(STRATEGIES))
    ] = "least-confident"
    size: Annotated[int, Field(ge=1, le=MAX_ROUND), Describe(f"an integer in 1..{MAX_ROUND}")] = 20


def api_for(project: int) -> LabelStudioAPI | Response:
    svc = services()
    conn = svc.loader.connection_for(str(project))
    if conn is None:
        return error_reply(
            409,
            f"no Label Studio host known for project {project}: connect the project to the "
            "backend (Settings > Model) or set LABEL_STUDIO_URL",
        )
    return LabelStudioAPI(conn.url, conn.token)


def shown(record: RoundRecord) -> dict[str, object]:
    return dataclasses.asdict(record)


def refused(exc: Exception) -> Response:
    if isinstance(exc, SelectionError):
        return error_reply(400, str(exc))
    if isinstance(exc, RoundError):
        return error_reply(409, str(exc))
    if isinstance(exc, LabelStudioAPIError) and exc.status == 404:
        return error_reply(404, str(exc))  # no such project in Label Studio
    return error_reply(502, str(exc))


@rounds.post("/rounds")
def create() -> Response:
    body = parse_body(RoundBody)
    project = body["project"]
    strategy = body.get("strategy", "least-confident")
    if strategy not in STRATEGIES:
        raise RequestError(f"field 'strategy' must be one of {', '.join(STRATEGIES)}")
    api = api_for(project)
    if isinstance(api, Response):
        return api
    try:
        record = make_round(api, project, strategy, body.get("size", 20), services().settings)
    except (RoundError, SelectionError, LabelStudioAPIError) as exc:
        log.warning("POST /rounds for project %s refused: %s", project, exc)
        return refused(exc)
    reply = jsonify(shown(record))
    reply.status_code = 201
    return reply


@rounds.get("/rounds")
def listing() -> Response:
    raw = request.args.get("project")
    if raw is None or not raw.isdigit() or int(raw) > MAX_ID:
        raise RequestError(f"query parameter 'project' must be a project id (0..{MAX_ID})")
    project = int(raw)
    if request.args.get("refresh") in ("1", "true"):
        api = api_for(project)
        if isinstance(api, Response):
            return api
        try:
            records = refresh_rounds(api, project, services().settings)
        except (RoundError, LabelStudioAPIError) as exc:
            log.warning("GET /rounds for project %s: refresh refused: %s", project, exc)
            return refused(exc)
    else:
        records = read_rounds(services().settings, str(project))
    return jsonify(project=project, rounds=[shown(r) for r in records])
