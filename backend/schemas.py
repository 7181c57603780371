"""The request bodies of the routes, declared once: what each route reads, with types and ranges.

A body is checked against its model before any handler reads it, so a handler never meets a
value of the wrong type (the source of every 500 a fuzzer found: ``"project": 1`` where an
object was read, a result that is a number, a choice list that is a number, an id beyond
SQLite's integers, ``Infinity`` as a width...). Only the fields the backend reads are
declared; everything else Label Studio sends is allowed and ignored (``extra="allow"``), so a
newer Label Studio adding fields changes nothing. Validation is strict (JSON types as they
are: no ``"5"`` for 5, no ``true`` for 1, no ``5.0`` for an integer).

A refusal names the field and says what it must be, as a path into the body:
``annotation.result[0].value.brushlabels must be an array of strings, got a number``; top-level
fields are quoted: ``field 'schema' must be a string, got a number``, ``missing field 'tasks'``.
The validated models are not handed on: handlers keep reading the plain JSON they always read,
now known to have this shape.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

MAX_ID = 2**63 - 1
"""Largest id the loop's store can hold: SQLite's INTEGER is a signed 64-bit number."""
MAX_SIDE = 2**31 - 1
"""Largest image side in pixels a result may declare (the pixel limits are checked later)."""


class BodyError(ValueError):
    """A body that does not fit its model; the message names the first field that is wrong."""


@dataclass(frozen=True)
class Describe:
    """What a value must be, in words, for types whose Python annotation does not say it."""

    text: str


def _project_key(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PydanticCustomError("project_key", "must be an integer or a non-empty string")
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("project_key", "must be an integer or a non-empty string")
    if isinstance(value, int) and not 0 <= value <= MAX_ID:
        raise PydanticCustomError("project_key", f"must be an integer in 0..{MAX_ID}")
    return value


def _array(value: Any) -> Any:
    """An array whose items are checked by the code that reads them (an RLE stream)."""
    if not isinstance(value, list):
        raise PydanticCustomError("list_type", "must be an array")
    return value  # as is: copying a stream of millions of bytes to check it twice is waste


def _project_object(value: Any) -> Any:
    """A project as an id alone (``"project": 3``) is the project ``{"id": 3}``."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        return {"id": value}
    return value


Id = Annotated[int, Field(ge=0, le=MAX_ID), Describe(f"an integer in 0..{MAX_ID}")]
Side = Annotated[int, Field(ge=0, le=MAX_SIDE), Describe(f"an integer in 0..{MAX_SIDE}")]
ProjectKey = Annotated[
    Any, PlainValidator(_project_key), Describe("an integer or a non-empty string")
]
RawArray = Annotated[Any, PlainValidator(_array), Describe("an array")]


class Body(BaseModel):
    """Strict JSON types; fields that are not declared are allowed and ignored."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


# ---------------------------------------------------------------------------- /setup


class SetupBody(Body):
    schema_: str = Field(alias="schema")
    project: ProjectKey | None = None
    hostname: str | None = None
    access_token: str | None = None


# ---------------------------------------------------------------------------- /predict


class PredictTask(Body):
    id: Id | None = None
    data: dict[str, Any]


MAX_CONTEXT_RESULTS = 100
"""Results an interactive call's context may hold: the editor sends the one region just drawn."""


class ContextResult(Body):
    type: str | None = None
    from_name: str | None = None
    to_name: str | None = None


class PredictContext(Body):
    """What the editor sends with an interactive call (``params.context``): the region drawn."""

    result: (
        Annotated[
            list[ContextResult],
            Field(max_length=MAX_CONTEXT_RESULTS),
            Describe(f"an array of at most {MAX_CONTEXT_RESULTS} objects"),
        ]
        | None
    ) = None


class PredictParams(Body):
    context: PredictContext | None = None


class PredictBody(Body):
    tasks: list[PredictTask]
    label_config: str | None = None
    project: ProjectKey | None = None
    params: PredictParams | None = None


# ---------------------------------------------------------------------------- /train, /rollback


class TrainBody(Body):
    """What Label Studio's ``train()`` sends (``annotations`` ride along, unread)."""

    project: ProjectKey
    label_config: str | None = None


class RollbackBody(Body):
    version: Annotated[
        str, Field(min_length=1, max_length=200), Describe("a version name of 1 to 200 characters")
    ]


# ---------------------------------------------------------------------------- /webhook


class ProjectRef(Body):
    id: ProjectKey
    label_config: str | None = None


Project = Annotated[ProjectRef, BeforeValidator(_project_object)]


Finite = Annotated[float, Field(allow_inf_nan=False), Describe("a number (not NaN or infinite)")]


class Touch(Body):
    """A stroke a draft keeps beside its brush's RLE (``backend/brush.py`` paints it)."""

    type: str | None = None
    relative_points: list[Finite] = Field(alias="relativePoints")
    relative_stroke_width: Finite | None = Field(default=None, alias="relativeStrokeWidth")


class ResultValue(Body):
    rle: RawArray | None = None
    brushlabels: list[str] | None = None
    choices: list[str] | None = None
    touches: list[Touch] | None = None


class Result(Body):
    type: str | None = None
    from_name: str | None = None
    to_name: str | None = None
    origin: str | None = None
    original_width: Side | None = None
    original_height: Side | None = None
    value: ResultValue | None = None


class Annotation(Body):
    id: Id
    result: list[Result]
    updated_at: str | None = None


class PredictionRef(Body):
    model_version: str | None = None


class WebhookTask(Body):
    id: Id
    data: dict[str, Any] | None = None
    predictions: list[PredictionRef] | None = None


class AnnotationRef(Body):
    id: Id


class WebhookBody(Body):
    action: str


class AnnotationEvent(WebhookBody):
    """ANNOTATION_CREATED and ANNOTATION_UPDATED."""

    project: Project
    annotation: Annotation
    task: WebhookTask


class DeletedEvent(WebhookBody):
    """ANNOTATIONS_DELETED."""

    project: Project
    annotations: list[AnnotationRef]


class TrainingEvent(WebhookBody):
    """START_TRAINING."""

    project: Project


class Draft(Body):
    """A user's autosaved, unsubmitted annotation, as an interactive call carries it."""

    id: Id
    result: list[Result]
    created_at: str | None = None
    updated_at: str | None = None


class CheckTask(Body):
    id: Id
    data: dict[str, Any]
    drafts: list[Draft] | None = None


class CheckBody(PredictBody):
    """A /predict whose context holds a point of the config's check control
    (``backend/map_check.py``): its task must carry an id and may carry drafts."""

    tasks: list[CheckTask]


WEBHOOK_EVENTS: dict[str, type[WebhookBody]] = {
    "ANNOTATION_CREATED": AnnotationEvent,
    "ANNOTATION_UPDATED": AnnotationEvent,
    "ANNOTATIONS_DELETED": DeletedEvent,
    "START_TRAINING": TrainingEvent,
}
"""The actions the backend acts on; any other is acknowledged and ignored, so only its
``action`` is checked."""


# ---------------------------------------------------------------------------- checking


def check(model: type[Body], body: Any) -> None:
    """Raise :class:`BodyError` naming the first field of `body` that does not fit `model`."""
    try:
        model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        message = describe_error(model, errors[0])
        if len(errors) > 1:
            more = len(errors) - 1
            message += f"; and {more} more problem{'s' if more > 1 else ''}"
        raise BodyError(message) from None


def describe_error(model: type[Body], error: Any) -> str:
    loc = tuple(error["loc"])
    path = format_path(loc)
    subject = f"field {path!r}" if len(loc) == 1 else path
    expected = expected_at(model, loc) or _FALLBACK.get(error["type"], "something else")
    kind = error["type"]
    if kind == "missing":
        if len(loc) == 1:
            return f"missing field {path!r} (it must be {expected})"
        return f"{path} must be {expected} (it is missing)"
    value = error.get("input")
    if kind == "too_long" and isinstance(value, list):
        return f"{subject} must be {expected}, got {len(value)}"
    if kind in _RANGE_ERRORS:
        return f"{subject} must be {expected}, got {_short(value)}"
    if kind == "project_key":
        return f"{subject} {error['msg']}, got {json_type(value)}"
    return f"{subject} must be {expected}, got {json_type(value)}"


def format_path(loc: tuple[Any, ...]) -> str:
    """``('annotation', 'result', 0, 'value')`` -> ``annotation.result[0].value``."""
    text = ""
    for step in loc:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text += f".{step}" if text else str(step)
    return text or "the body"


def expected_at(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """What the value at `loc` must be, from the model's annotations (None: not declared)."""
    annotation: Any = model
    for step in loc:
        annotation = _strip(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (f for name, f in annotation.model_fields.items() if (f.alias or name) == step),
                None,
            )
            if field is None:
                return None
            annotation = (
                Annotated[(field.annotation, *field.metadata)]
                if field.metadata
                else (field.annotation)
            )
        elif typing.get_origin(annotation) is list and isinstance(step, int):
            (annotation,) = typing.get_args(annotation) or (Any,)
        elif typing.get_origin(annotation) is dict:
            annotation = (typing.get_args(annotation) or (Any, Any))[1]
        else:
            return None
    return _describe(annotation)


def _strip(annotation: Any) -> Any:
    """Without ``Optional`` and ``Annotated`` wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _describe(annotation: Any, plural: bool = False) -> str | None:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *metadata = typing.get_args(annotation)
        for item in metadata:
            if isinstance(item, Describe):
                return _pluralise(item.text) if plural else item.text
        low = next((m.ge for m in _flat(metadata) if isinstance(m, annotated_types.Ge)), None)
        high = next((m.le for m in _flat(metadata) if isinstance(m, annotated_types.Le)), None)
        text = _describe(base, plural)
        if text and (low is not None or high is not None):
            text += f" in {'' if low is None else low}..{'' if high is None else high}"
        return text
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _describe(args[0], plural) if len(args) == 1 else None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        items = _describe(item, plural=True)
        text = "an array" + (f" of {items}" if items else "")
        return _pluralise(text) if plural else text
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "objects" if plural else "an object"
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    text = names.get(annotation)
    return _pluralise(text) if plural and text else text


def _flat(metadata: list[Any]) -> list[Any]:
    """Field(...) metadata arrives as a FieldInfo holding the annotated_types constraints."""
    flat = []
    for item in metadata:
        flat.extend(getattr(item, "metadata", None) or [item])
    return flat


def _pluralise(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            head, _, rest = text[len(article) :].partition(" ")
            return f"{head}s" + (f" {rest}" if rest else "")
    return text


_RANGE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "string_too_short",
    "string_too_long",
    "too_long",
}
_FALLBACK = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def json_type(value: object) -> str:
    """The JSON name of a value's type, as a refusal reports it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {
        type(None): "null",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
