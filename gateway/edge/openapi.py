"""OpenAPI entries for the endpoints of gateway.yaml (their routes are plain Starlette routes)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from gateway.core.plan import INT_MAX, INT_MIN, MAX_SEGMENT, EndpointPlan

# The bounds that parameter parsing enforces (gateway/core/plan.py); anything outside them is a 422.
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


_LIST_META = {
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
}

_VALIDATION = {
    "description": "Validation Error",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
    },
}


def _document(plan: EndpointPlan) -> dict[str, Any]:
    if plan.shape is not None:
        fields: dict[str, Any] = {f.name: {} for f in plan.shape}
    else:
        fields = {cp.name: {} for cp in plan.calls}
    return {"type": "object", "properties": {**fields, "_meta": _META}, "required": ["_meta"]}


def _failures(error: dict[str, Any]) -> dict[str, Any]:
    return {
        "404": {"description": "A required call found nothing.", **error},
        "422": _VALIDATION,
        "502": {"description": "A required call failed.", **error},
        "503": {"description": "A required call's breaker is open.", **error},
        "504": {"description": "A required call timed out.", **error},
    }


def endpoint_paths(plans: Iterable[EndpointPlan]) -> dict[str, Any]:
    """Return the OpenAPI `paths` entries of the configured endpoints."""
    by_id = {plan.id: plan for plan in plans}
    paths: dict[str, Any] = {}
    error = {"content": {"application/json": {"schema": _ERROR}}}
    for plan in by_id.values():
        parameters: list[dict[str, Any]] = [
            {"name": p.name, "in": "path", "required": True, "schema": _TYPES[p.type]}
            for p in plan.params
        ]
        listing = plan.listing
        if listing is None:
            summary = f"Aggregate {', '.join(cp.name for cp in plan.calls)}"
            ok = {
                "description": "The merged document; `_meta.complete` is false when an "
                "optional call failed and took its fallback.",
                "content": {"application/json": {"schema": _document(plan)}},
            }
            responses = {
                "200": ok,
                "304": {"description": "Not modified (If-None-Match matched the ETag)."},
                **_failures(error),
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
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "items": {
                                    "type": "array",
                                    "items": {"anyOf": [_document(item), {"type": "null"}]},
                                },
                                "_meta": _LIST_META,
                            },
                            "required": ["items", "_meta"],
                        }
                    }
                },
            }
            responses = {
                "200": ok,
                "304": {"description": "Not modified (If-None-Match matched the ETag)."},
            }
            if listing.call is None:
                responses["422"] = _VALIDATION
            else:
                responses.update(_failures(error))
        paths[plan.route_path] = {
            "get": {
                "summary": summary,
                "operationId": "get_"
                + "_".join(s.strip("{}") for s in plan.route_path.split("/") if s),
                "tags": ["endpoints"],
                "parameters": parameters,
                "responses": responses,
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


# --- the documentation pages -------------------------------------------------------------------

DOCS_ASSETS = "/docs/assets"
"""Where Swagger UI's and ReDoc's files are served from (the package fastapi-offline ships them)."""


def install_docs(app: FastAPI) -> None:
    """Serve `/docs` (Swagger UI) and `/redoc` with every asset from this process, none from a CDN:
    the docs work on a machine without internet, and send no visitor's address to a third party.
    """
    static = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(static)), name="docs-assets")
    favicon = f"{DOCS_ASSETS}/favicon.png"
    redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=redirect,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=favicon,
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )
