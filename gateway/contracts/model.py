"""What a contract file says: its models (pydantic, at the file's boundary, unknown keys are
errors) and the checked, frozen cases the runner plays."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator

from gateway.config.sources import Model

MAX_DELAY_MS = 30_000
"""The longest scripted delay (the scripted servers' own bound on any wait)."""


def _header_text(v: Any) -> Any:
    # `X-Gateway-Complete: false` in YAML is a boolean: a header value is its text.
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return v


HeaderValue = Annotated[
    str,
    BeforeValidator(_header_text),
    WithJsonSchema(
        {"type": ["string", "boolean", "number"], "description": "A header value (as text)."}
    ),
]
Delay = Annotated[int, Field(ge=0, le=MAX_DELAY_MS)]
Status = Annotated[int, Field(ge=100, le=599)]


class HttpExpect(Model):
    """What the gateway must send to an HTTP source: the path, query values and headers listed
    (a header given as null must not be sent)."""

    path: str | None = None
    query: dict[str, HeaderValue] | None = None
    headers: dict[str, HeaderValue | None] = Field(default_factory=dict)


class SqlExpect(Model):
    """What the gateway must bind in a SQL source's query: the parameters listed."""

    params: dict[str, Any] = Field(default_factory=dict)


class HttpAnswer(Model):
    """One scripted HTTP answer: `json` (encoded) or `body` (as is), after `delay_ms`."""

    status: Status = 200
    json_: Any = Field(default=None, alias="json")
    body: str | None = None
    headers: dict[str, HeaderValue] = Field(default_factory=dict)
    delay_ms: Delay = 0
    expect: HttpExpect | None = None

    @model_validator(mode="after")
    def _one_body(self) -> HttpAnswer:
        if "json_" in self.model_fields_set and self.body is not None:
            raise ValueError("give json or body, not both")
        return self


class SqlAnswer(Model):
    """One scripted SQL answer: `rows` (as the driver would return them) or an `error`."""

    rows: list[dict[str, Any]] | None = None
    error: str | None = None
    delay_ms: Delay = 0
    expect: SqlExpect | None = None

    @model_validator(mode="after")
    def _rows_or_error(self) -> SqlAnswer:
        if (self.rows is None) == (self.error is None):
            raise ValueError("give rows or error (one of them)")
        return self


class Request(Model):
    """The request a case sends to the gateway (GET)."""

    path: Annotated[str, Field(pattern=r"^/")]
    headers: dict[str, HeaderValue] = Field(default_factory=dict)


class Expect(Model):
    """What the gateway must answer: the status, the headers listed (null: absent), `json` as a
    subset, and optionally an upper bound on the time it takes."""

    status: Status
    headers: dict[str, HeaderValue | None] = Field(default_factory=dict)
    json_: Any = Field(default=None, alias="json")
    within_ms: Annotated[int, Field(gt=0, le=600_000)] | None = None

    @property
    def has_json(self) -> bool:
        return "json_" in self.model_fields_set


class CaseModel(Model):
    """One case as written: its upstreams are checked per source kind once the config is known."""

    name: Annotated[str, Field(min_length=1)]
    request: Request
    upstreams: dict[str, Any] = Field(default_factory=dict)
    expect: Expect


class ContractModel(Model):
    """A contract file: the endpoint (its path as written in the config) and its cases (each
    a `CaseModel`, validated one by one so that one bad case hides nothing of the others)."""

    endpoint: str
    cases: Annotated[list[dict[str, Any]], Field(min_length=1)]


Answer = HttpAnswer | SqlAnswer

CONTRACT_SCHEMA_ID = "urn:aggregation-gateway:contract:v1"


def contract_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a contract file, for editors and for tests:
    its cases are `CaseModel`s, and each upstream is an answer (http or sql) or a list of them."""
    case = CaseModel.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    defs = case.pop("$defs", {})
    for name, model in (("HttpAnswer", HttpAnswer), ("SqlAnswer", SqlAnswer)):
        schema = model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[name] = schema
    answer = {"anyOf": [{"$ref": "#/$defs/HttpAnswer"}, {"$ref": "#/$defs/SqlAnswer"}]}
    case["properties"]["upstreams"] = {
        "type": "object",
        "description": "Each source's scripted answer, or its answers in call order.",
        "additionalProperties": {"anyOf": [answer, {"type": "array", "items": answer}]},
    }
    defs["Case"] = case
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": CONTRACT_SCHEMA_ID,
        "title": "gateway contract file",
        "type": "object",
        "additionalProperties": False,
        "required": ["endpoint", "cases"],
        "properties": {
            "endpoint": {"type": "string", "description": "The endpoint's path as written."},
            "cases": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Case"}},
        },
        "$defs": defs,
    }


@dataclass(frozen=True, slots=True)
class Script:
    """A source's answers for one case, in call order; `repeat`: one answer for every request."""

    source: str
    kind: Literal["http", "sql"]
    answers: tuple[Answer, ...]
    repeat: bool


@dataclass(frozen=True, slots=True)
class Case:
    """One checked case: the scripts of every source the endpoint uses (unscripted: none)."""

    name: str
    line: int
    request: Request
    scripts: Mapping[str, Script]
    expect: Expect


@dataclass(frozen=True, slots=True)
class Contract:
    """A checked contract file."""

    file: str
    endpoint: str
    cases: tuple[Case, ...]
