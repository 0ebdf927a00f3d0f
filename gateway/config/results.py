"""A call's typed result: its declared JSON Schema as `select` and its fallback leave the value,
and the validator `validate: true` checks results with, compiled once when the config loads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema_rs

from gateway.config.schema import CallConfig, EndpointConfig


def shape_path(text: str) -> tuple[str, tuple[str | int, ...]]:
    """Split a `shape` path (`reviews.items.0.text`) into the call it reads and the steps into
    its value: a part of ASCII digits is a list index, any other part a field name."""
    call, *rest = text.split(".")
    return call, tuple(int(p) if p.isascii() and p.isdigit() else p for p in rest)


def narrowed(call: CallConfig) -> dict[str, Any] | None:
    """Return the declared schema as `select` leaves the value: only the kept properties (of
    the items, for an array); None when the call declares no schema."""
    if call.schema_ is None or call.select is None:
        return call.schema_
    return _narrow(call.schema_, frozenset(call.select))


def result_schema(call: CallConfig) -> Mapping[str, Any] | None:
    """Return the JSON Schema of the value `call` puts in the document: its narrowed schema,
    or null too when a failure puts its null fallback there; None when it declares none."""
    schema = narrowed(call)
    if schema is None or call.required or call.omit or call.fallback is not None:
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def compile_schema(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """Return the validator of a JSON Schema, never fetching a remote `$ref`; raise
    `jsonschema_rs.ValidationError` (a ValueError) when it is not a valid schema."""
    return jsonschema_rs.validator_for(schema, retriever=_no_remote)


def validator(call: CallConfig, ep: EndpointConfig) -> jsonschema_rs.Validator | None:
    """Return the validator of `call`'s results when it (or else its endpoint) says
    `validate: true` and it declares a schema; else None."""
    check = ep.validate_ if call.validate_ is None else call.validate_
    schema = narrowed(call)
    return compile_schema(schema) if check and schema is not None else None


def _no_remote(uri: str) -> Any:
    raise ValueError(f"remote references are not fetched ({uri}): put the schema inline")


def _narrow(schema: dict[str, Any], keep: frozenset[str]) -> dict[str, Any]:
    # One level, as `select` itself: an object's properties, or its array items' properties.
    out = dict(schema)
    props = schema.get("properties")
    if isinstance(props, dict):
        out["properties"] = {k: v for k, v in props.items() if k in keep}
        required = schema.get("required")
        if isinstance(required, list):
            out["required"] = [r for r in required if r in keep]
    items = schema.get("items")
    if isinstance(items, dict) and isinstance(items.get("properties"), dict):
        out["items"] = _narrow(items, keep)
    return out
