"""Composite -> response document, in declared order, encoded once."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from gateway.core.executor import Composite
from gateway.core.plan import EndpointPlan, ShapedField
from gateway.core.types import Outcome

# What a failed required call means for the whole answer.
STATUS_OF_OUTCOME: dict[Outcome, int] = {
    "not_found": 404,
    "timeout": 504,
    "circuit_open": 503,
    "overloaded": 503,
    "error": 502,
    "skipped": 502,
}


def merge(plan: EndpointPlan, composite: Composite) -> dict[str, Any]:
    """Return the response document: each call's result or fallback by name (or the fields of
    its `shape`), then `_meta`."""
    doc: dict[str, Any] = {}
    failed: dict[str, Outcome] = {}
    for cp in plan.calls:
        result = composite.results[cp.name]
        if result.outcome == "ok":
            doc[cp.name] = result.value
            continue
        failed[cp.name] = result.outcome
        if not cp.omit:
            doc[cp.name] = cp.fallback
    if plan.shape is not None:
        doc = _shaped(plan.shape, doc)
    doc["_meta"] = {"complete": not failed, "sources": failed}
    return doc


_MISSING = object()


def _shaped(fields: tuple[ShapedField, ...], values: dict[str, Any]) -> dict[str, Any]:
    """Return the document of a `shape`: each field read from the calls' values (results or
    fallbacks) by its path; one that finds nothing takes its default, or is left out."""
    doc: dict[str, Any] = {}
    for f in fields:
        value = values.get(f.call, _MISSING)
        for step in f.path:
            if type(step) is int:
                value = value[step] if isinstance(value, list) and step < len(value) else _MISSING
            elif isinstance(value, dict):
                value = value.get(step, _MISSING)
            else:
                value = _MISSING
            if value is _MISSING:
                break
        if value is not _MISSING:
            doc[f.name] = value
        elif f.has_default:
            doc[f.name] = f.default
    return doc


def error_document(plan: EndpointPlan, composite: Composite) -> tuple[int, dict[str, Any]]:
    """Return the status and JSON error body for a composite whose required call failed."""
    assert composite.failed is not None
    result = composite.results[composite.failed]
    status = STATUS_OF_OUTCOME[result.outcome]
    message = {
        404: "not found",
        502: "a required source failed",
        503: "a required source is unavailable",
        504: "a required source timed out",
    }[status]
    return status, {
        "error": {
            "status": status,
            "message": message,
            "call": composite.failed,
            "outcome": result.outcome,
        },
        "_meta": {
            "complete": False,
            "sources": {n: r.outcome for n, r in composite.results.items() if r.outcome != "ok"},
        },
    }


def answer(plan: EndpointPlan, composite: Composite) -> tuple[Composite, int, bytes]:
    """Return the composite as answered, and the status and bytes of its document.

    The document is encoded once. Only when that fails (a value nested deeper than orjson
    encodes, 255 levels, though it decodes 1024) is each call's value tried on its own: one that
    cannot be encoded becomes that call's `error`, its fallback applies, and the composite
    returned says so (a required call's failure answers as such).
    """
    try:
        status, body = _encoded(plan, composite)
    except orjson.JSONEncodeError:
        composite = _unencodable_as_errors(plan, composite)
        status, body = _encoded(plan, composite)
    return composite, status, body


def _encoded(plan: EndpointPlan, composite: Composite) -> tuple[int, bytes]:
    if composite.failed is not None:
        status, doc = error_document(plan, composite)
        return status, encode(doc)
    return 200, encode(merge(plan, composite))


def _unencodable_as_errors(plan: EndpointPlan, composite: Composite) -> Composite:
    results = dict(composite.results)
    for name, result in composite.results.items():
        if result.outcome != "ok":
            continue
        try:
            orjson.dumps([result.value])  # one level down, as it sits in the document
        except orjson.JSONEncodeError as exc:
            results[name] = replace(
                result, outcome="error", value=None, detail=f"not encodable: {exc}"
            )
    failed = composite.failed or next(
        (
            cp.name
            for cp in plan.calls
            if cp.required and cp.name in results and results[cp.name].outcome != "ok"
        ),
        None,
    )
    return Composite(results, failed)


def encode(doc: Any) -> bytes:
    """Encode a document to JSON bytes, once."""
    return orjson.dumps(doc)


def with_stale_age(body: bytes, age_s: float) -> bytes:
    """Return a stored body with `_meta.stale_age_s` added, without decoding it.

    Our bodies always end with the `_meta` object, so the field is spliced before its end.
    """
    if not body.endswith(b"}}"):
        return body
    return body[:-2] + b',"stale_age_s":' + orjson.dumps(round(age_s, 3)) + b"}}"
