"""Composite -> response document, in declared order, encoded once."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.executor import Composite
from gateway.plan import EndpointPlan

# What a failed required call means for the whole answer.
STATUS_OF_OUTCOME = {
    "not_found": 404,
    "timeout": 504,
    "circuit_open": 503,
    "overloaded": 503,
    "error": 502,
    "skipped": 502,
}


def merge(plan: EndpointPlan, composite: Composite) -> dict[str, Any]:
    """Return the response document: each call's result or fallback by name, then `_meta`."""
    doc: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for cp in plan.calls:
        result = composite.results[cp.name]
        if result.outcome == "ok":
            doc[cp.name] = result.value
            continue
        failed[cp.name] = result.outcome
        if not cp.omit:
            doc[cp.name] = cp.fallback
    doc["_meta"] = {"complete": not failed, "sources": failed}
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
