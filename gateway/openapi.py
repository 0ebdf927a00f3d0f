"""OpenAPI entries for the endpoints of gateway.yaml (their routes are plain Starlette routes)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.plan import INT_MAX, INT_MIN, MAX_SEGMENT, EndpointPlan

# The bounds that parameter parsing enforces (gateway/plan.py); anything outside them is a 422.
_TYPES = {
    "int": {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX},
    "str": {"type": "string", "maxLength": MAX_SEGMENT},
    "float": {"type": "number", "description": "A finite number: nan and inf are refused."},
}

_META = {
    "type": "object",
    "properties": {
        "complete": {"type": "boolean"},
        "sources": {"type": "object", "additionalProperties": {"type": "string"}},
        "stale_age_s": {"type": "number"},
    },
    "required": ["complete", "sources"],
}

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "status": {"type": "integer"},
                "message": {"type": "string"},
                "call": {"type": "string"},
                "outcome": {"type": "string"},
            },
            "required": ["status", "message"],
        },
        "_meta": _META,
    },
    "required": ["error"],
}


def endpoint_paths(plans: Iterable[EndpointPlan]) -> dict[str, Any]:
    """Return the OpenAPI `paths` entries of the configured endpoints."""
    paths: dict[str, Any] = {}
    for plan in plans:
        calls: dict[str, Any] = {cp.name: {} for cp in plan.calls}
        error = {"content": {"application/json": {"schema": _ERROR}}}
        paths[plan.route_path] = {
            "get": {
                "summary": f"Aggregate {', '.join(calls)}",
                "operationId": "get_"
                + "_".join(s.strip("{}") for s in plan.route_path.split("/") if s),
                "tags": ["endpoints"],
                "parameters": [
                    {"name": p.name, "in": "path", "required": True, "schema": _TYPES[p.type]}
                    for p in plan.params
                ],
                "responses": {
                    "200": {
                        "description": "The merged document; `_meta.complete` is false when an "
                        "optional call failed and took its fallback.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {**calls, "_meta": _META},
                                    "required": ["_meta"],
                                }
                            }
                        },
                    },
                    "304": {"description": "Not modified (If-None-Match matched the ETag)."},
                    "404": {"description": "A required call found nothing.", **error},
                    "422": {
                        "description": "Validation Error",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/HTTPValidationError"}
                            }
                        },
                    },
                    "502": {"description": "A required call failed.", **error},
                    "503": {"description": "A required call's breaker is open.", **error},
                    "504": {"description": "A required call timed out.", **error},
                },
            }
        }
    return paths


def validation_schemas() -> dict[str, Any]:
    """Return FastAPI's validation error schemas, referenced by every endpoint's 422."""
    return {
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
                "input": {"title": "Input"},
            },
        },
    }
