"""The outer ASGI stack: access log and metrics around a fast path for the configured
endpoints, with everything else (docs, health, admin, metrics) going through FastAPI."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.edge.limits import MAX_HEADER_BYTES, RequestLimits
from gateway.ops.log import AccessLog, Observer


class EndpointRoutes:
    """Pure ASGI app: an endpoint route that fully matches is served at once; any other request
    goes to `fallback` (FastAPI's own stack, which also answers 405 for other methods)."""

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


def outer_stack(
    framework: ASGIApp,
    routes: Callable[[], Sequence[BaseRoute]],
    observe: Observer,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> ASGIApp:
    """Return the stack, outermost first: access log (with request metrics), request size limits,
    endpoint fast path, then the framework. Endpoint requests skip FastAPI's middleware and
    router: measured by bench/, they are the product's hot path."""
    app: ASGIApp = EndpointRoutes(routes, framework)
    return AccessLog(RequestLimits(app, max_header_bytes), observe)
