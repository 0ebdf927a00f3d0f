"""The ASGI app the server runs: access log, request limits and the endpoint routes in plain
ASGI, with everything else (docs, health, admin, metrics, OpenAPI, lifespan) handed to the
FastAPI app inside it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.edge.limits import MAX_HEADER_BYTES, RequestLimits
from gateway.ops.log import AccessLog, Observer


class EndpointRoutes:
    """Pure ASGI app: an endpoint route that fully matches is served at once; any other request
    goes to `fallback` (the FastAPI app, which also answers 405 for other methods)."""

    def __init__(self, routes: Callable[[], Sequence[BaseRoute]], fallback: ASGIApp) -> None:
        self.routes = routes
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes():
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    await route.handle(scope, receive, send)
                    return
        await self.fallback(scope, receive, send)


class Edge:
    """The gateway's ASGI app, outermost first: access log (with request metrics), request size
    limits, endpoint fast path, then `framework`, the FastAPI app, for every other request and
    for lifespan events. Endpoint requests never enter FastAPI: measured by bench/, they are
    the product's hot path."""

    def __init__(
        self,
        framework: FastAPI,
        routes: Callable[[], Sequence[BaseRoute]],
        observe: Observer,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.framework = framework
        # What code written for a Starlette app reads (`app.state`, `app.router.lifespan_context`)
        # is the framework app's.
        self.state = framework.state
        self.router = framework.router
        self._app: ASGIApp = AccessLog(
            RequestLimits(EndpointRoutes(routes, framework), max_header_bytes), observe
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """Return the OpenAPI document the framework app serves at /openapi.json."""
        return self.framework.openapi()
