"""OpenAPI entries for the endpoints of gateway.yaml (their routes are plain Starlette routes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.core.plan import INT_MAX, INT_MIN, MAX_SEGMENT, EndpointPlan
from gateway.core.types import OUTCOMES

# The bounds that parameter parsing enforces (gateway/core/plan.py); anything outside them is a 422.
_TYPES = {
    "int": {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX},
    "str": {"type": "string", "maxLength": MAX_SEGMENT},
    "float": {"type": "number", "description": "A finite number: nan and inf are refused."},
}

OUTCOME_WORDS = [o for o in OUTCOMES if o != "ok"]
"""How a call can fail, as `_meta.sources` and `error.outcome` name it."""

CACHE_STATES = ["HIT", "MISS", "STALE", "BYPASS"]
"""The values of `X-Cache`."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_NULL = {"type": "null"}

SHARED_SCHEMAS: dict[str, Any] = {
    "Meta": {
        "type": "object",
        "description": "Whether every call answered, and how each one that did not failed.",
        "properties": {
            "complete": {"type": "boolean"},
            "sources": {
                "type": "object",
                "additionalProperties": {"type": "string", "enum": OUTCOME_WORDS},
            },
            "stale_age_s": {
                "type": "number",
                "description": "Set on a stale answer served because its sources failed.",
            },
        },
        "required": ["complete", "sources"],
    },
    "ErrorBody": {
        "type": "object",
        "description": "Why the gateway could not answer: a required call failed.",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "status": {"type": "integer"},
                    "message": {"type": "string"},
                    "call": {"type": "string"},
                    "outcome": {"type": "string", "enum": OUTCOME_WORDS},
                },
                "required": ["status", "message"],
            },
            "_meta": _ref("Meta"),
        },
        "required": ["error"],
    },
    "ListingMeta": {
        "type": "object",
        "properties": {
            "complete": {"type": "boolean"},
            "items": {
                "type": "object",
                "description": "Why an item is null or partial, by its id.",
                "additionalProperties": {
                    "type": "string",
                    "enum": ["not_found", "partial", "error", "timeout"],
                },
            },
            "dropped": {
                "type": "integer",
                "description": "Ids found past the listing's max, not fetched.",
            },
        },
        "required": ["complete", "items"],
    },
}
"""The components every endpoint's answers refer to."""


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


SHARED_HEADERS: dict[str, Any] = {
    "X-Cache": _header(
        "How the cache answered: HIT, MISS, STALE (served stale), BYPASS (not cached).",
        {"type": "string", "enum": CACHE_STATES},
    ),
    "X-Gateway-Complete": _header(
        "Whether every call answered (`_meta.complete`).",
        {"type": "string", "enum": ["true", "false"]},
    ),
    "ETag": _header("The answer's entity tag, for If-None-Match."),
    "Cache-Control": _header(
        "`public, max-age=N` (or `private`) on a complete answer, `no-store` otherwise."
    ),
    "Server-Timing": _header("Each call's outcome and duration, or the cache's state."),
    "X-Request-ID": _header("The request's id: the client's own when it sent a usable one."),
    "Vary": _header("The request headers this endpoint's answers vary by."),
}
"""The response headers the gateway sends, declared by each route and status."""


def _headers(*names: str) -> dict[str, Any]:
    # Written out, not referenced: a Reference Object cannot say `required`.
    return {n: {**SHARED_HEADERS[n], "required": req} for n, req in map(_required, names)}


def _required(name: str) -> tuple[str, bool]:
    # A trailing `?` marks a header that is only sometimes sent.
    return name.removesuffix("?"), not name.endswith("?")


def _request_headers(plan: EndpointPlan, explain: bool) -> list[dict[str, Any]]:
    def header(name: str, description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "header",
            "required": False,
            "description": description,
            "schema": {"type": "string"},
        }

    out = [
        header("If-None-Match", "An ETag of an earlier answer: 304 while it still matches."),
        header(
            "X-Request-ID",
            "The request's id (1-128 visible ASCII characters), logged and "
            "sent on to every source; another is made when absent or unusable.",
        ),
        header("traceparent", "W3C trace context: the request's parent span."),
        header("tracestate", "W3C trace context: vendors' state, passed on."),
    ]
    if plan.cache is not None and plan.cache.allow_client_bypass:
        out.append(header("Cache-Control", "`no-cache` computes a fresh answer."))
    if explain:
        out.append(
            {
                **header(
                    "X-Gateway-Explain",
                    "`1`, with the admin token in Authorization: "
                    "Bearer, adds `_explain` to this answer (never stored).",
                ),
                "schema": {"type": "string", "enum": ["1"]},
            }
        )
    return out


def document_name(plan: EndpointPlan) -> str:
    """Return the component name of an endpoint's document (from its operationId)."""
    words = [s.strip("{}") for s in plan.route_path.split("/") if s]
    return "".join(w[:1].upper() + w[1:] for w in "_".join(words).split("_") if w) + "Document"


def _operation_id(plan: EndpointPlan) -> str:
    return "get_" + "_".join(s.strip("{}") for s in plan.route_path.split("/") if s)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if not schema or kind == "null" or (isinstance(kind, list) and "null" in kind):
        return schema
    branches = schema.get("anyOf")
    if isinstance(branches, list) and _NULL in branches:
        return schema
    return {"anyOf": [schema, _NULL]}


def walk(schema: Mapping[str, Any] | None, path: tuple[str | int, ...]) -> dict[str, Any]:
    """Return the schema of what `path` reads in a value of `schema` (`{}` when unknown).

    A null on the way finds nothing (the field's default applies), so a nullable step is
    followed through its other branch.
    """
    here: Mapping[str, Any] = schema or {}
    for step in path:
        branches = here.get("anyOf")
        if isinstance(branches, list):
            rest = [b for b in branches if b != _NULL]
            if len(rest) != 1:
                return {}
            here = rest[0]
        if isinstance(step, int):
            nested = here.get("items")
            prefix = here.get("prefixItems")
            if isinstance(prefix, list) and step < len(prefix):
                nested = prefix[step]
        else:
            nested = (here.get("properties") or {}).get(step)
        if not isinstance(nested, Mapping):
            return {}
        here = nested
    return dict(here)


def _document(plan: EndpointPlan) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    required: list[str] = []
    schemas = {cp.name: cp.result_schema for cp in plan.calls}
    if plan.shape is not None:
        for f in plan.shape:
            field = walk(schemas.get(f.call), f.path)
            if f.has_default and f.default is None:
                field = _nullable(field)
            fields[f.name] = field
            if f.has_default:
                required.append(f.name)
    else:
        for cp in plan.calls:
            fields[cp.name] = dict(schemas[cp.name] or {})
            if not cp.omit:
                required.append(cp.name)
    return {
        "type": "object",
        "properties": {**fields, "_meta": _ref("Meta")},
        "required": [*required, "_meta"],
    }


def _failures(headers: dict[str, Any]) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": _ref("ErrorBody")}}, "headers": headers}
    return {
        "404": {"description": "A required call found nothing.", **error},
        "502": {"description": "A required call failed.", **error},
        "503": {
            "description": "A required call's breaker is open, or its source is overloaded.",
            **error,
        },
        "504": {"description": "A required call timed out.", **error},
    }


_VALIDATION = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": _ref("HTTPValidationError")}},
    "headers": _headers("X-Request-ID"),
}


def endpoint_paths(plans: Iterable[EndpointPlan], explain: bool = False) -> dict[str, Any]:
    """Return the OpenAPI `paths` entries of the configured endpoints (`explain`: the admin
    token is set, so X-Gateway-Explain is read)."""
    by_id = {plan.id: plan for plan in plans}
    paths: dict[str, Any] = {}
    for plan in by_id.values():
        parameters: list[dict[str, Any]] = [
            {"name": p.name, "in": "path", "required": True, "schema": _TYPES[p.type]}
            for p in plan.params
        ]
        listing = plan.listing
        varies = plan if listing is None else by_id[listing.item]
        vary = ("Vary",) if varies.vary else ()
        sent = ("X-Gateway-Complete", "X-Cache", "Cache-Control", "Server-Timing", *vary)
        not_modified = {
            "description": "Not modified (If-None-Match matched the ETag).",
            "headers": _headers(*sent, "ETag", "X-Request-ID"),
        }
        if listing is None:
            summary = f"Aggregate {', '.join(cp.name for cp in plan.calls)}"
            ok = {
                "description": "The merged document; `_meta.complete` is false when an "
                "optional call failed and took its fallback.",
                "content": {"application/json": {"schema": _ref(document_name(plan))}},
                "headers": _headers(*sent, "ETag?", "X-Request-ID"),
            }
            responses = {
                "200": ok,
                "304": not_modified,
                "422": _VALIDATION,
                **_failures(_headers(*sent, "ETag?", "X-Request-ID")),
            }
        else:
            item = by_id[listing.item]
            id_type = _TYPES[item.params[0].type]
            summary = f"List items of {item.path}"
            if listing.query is not None:
                parameters.append(
                    {
                        "name": listing.query,
                        "in": "query",
                        "required": True,
                        "description": f"Comma-separated ids, at most {listing.max}; "
                        "duplicates are fetched once.",
                        "style": "form",
                        "explode": False,
                        "schema": {"type": "array", "maxItems": listing.max, "items": id_type},
                    }
                )
            ok = {
                "description": "One item document per id, in the order asked, each as "
                f"{item.path} answers it; null where it failed (the reason in "
                "`_meta.items`).",
                "content": {"application/json": {"schema": _ref(document_name(plan))}},
                "headers": _headers(*sent, "ETag?", "X-Request-ID"),
            }
            responses = {"200": ok, "304": not_modified, "422": _VALIDATION}
            if listing.call is not None:
                responses.update(
                    _failures(_headers("X-Gateway-Complete", "Cache-Control", "X-Request-ID"))
                )
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": _operation_id(plan),
            "tags": ["endpoints"],
            "parameters": [*parameters, *_request_headers(varies, explain)],
            "responses": responses,
        }
        if explain:
            # The admin token is optional here: only X-Gateway-Explain reads it.
            operation["security"] = [{}, {"adminToken": []}]
        paths[plan.route_path] = {"get": operation}
    return paths


def endpoint_schemas(plans: Iterable[EndpointPlan]) -> dict[str, Any]:
    """Return the shared components and each endpoint's document, by component name."""
    by_id = {plan.id: plan for plan in plans}
    out: dict[str, Any] = dict(SHARED_SCHEMAS)
    for plan in by_id.values():
        if plan.listing is None:
            out[document_name(plan)] = _document(plan)
            continue
        item = _ref(document_name(by_id[plan.listing.item]))
        out[document_name(plan)] = {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": {"anyOf": [item, _NULL]}},
                "_meta": _ref("ListingMeta"),
            },
            "required": ["items", "_meta"],
        }
    return out


def with_request_ids(schema: dict[str, Any]) -> dict[str, Any]:
    """Return `schema` with `X-Request-ID` declared on every response (the access log sends it
    on all of them)."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {}).setdefault(
                    "X-Request-ID", _headers("X-Request-ID")["X-Request-ID"]
                )
    return schema


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
