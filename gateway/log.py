"""Structured logs: structlog set up once, and the pure-ASGI middleware that writes access lines."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def configure(fmt: str | None = None, level: int | None = None) -> None:
    """Set up structlog: JSON lines, or a readable console with `GATEWAY_LOG_FORMAT=console`;
    `GATEWAY_LOG_LEVEL=warning` drops the per-request access lines (info)."""
    fmt = fmt or os.environ.get("GATEWAY_LOG_FORMAT", "json")
    if level is None:
        name = os.environ.get("GATEWAY_LOG_LEVEL", "info").upper()
        level = logging.getLevelNamesMapping().get(name, logging.INFO)
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_json)
    )
    structlog.configure(
        processors=[
            add_request_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # Not cached: a cached logger would escape later reconfiguration (and capture_logs).
        cache_logger_on_first_use=False,
    )


def _json(event: Any, **_: Any) -> str:
    # orjson: the access line is written once per request, so its encoding is on the hot path.
    return orjson.dumps(event, default=repr).decode()


def add_request_id(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Processor: add the current request's id (inherited by every task of its fan-out)."""
    info = current.get()
    if info is not None:
        event.setdefault("request_id", info.request_id)
    return event


@dataclass(slots=True)
class RequestInfo:
    """What one request did, filled in by the handler and written once by the access log."""

    request_id: str
    endpoint: str = ""
    cache: str = ""
    complete: bool | None = None
    disconnected: bool = False
    calls: dict[str, Any] = field(default_factory=dict)


current: ContextVar[RequestInfo | None] = ContextVar("gateway_request", default=None)
_REQUEST_ID = b"x-request-id"


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID:
            text = value.decode("latin-1")
            # A client's id is echoed only when it is short and printable: it lands in our logs.
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return f"{_ID_PREFIX}{next(_ids):x}"


# A random per-process prefix and a counter: unique ids at the cost of an increment.
_ID_PREFIX = os.urandom(6).hex() + "-"
_ids = itertools.count(1)


Observer = Callable[[Scope, RequestInfo, int, float], None]
"""Called once per finished request with its scope, info, status and duration in seconds."""


class AccessLog:
    """Pure ASGI middleware: binds the request id, echoes it, logs one line per request and
    tells `observe` (the request metrics) about it."""

    def __init__(self, app: ASGIApp, observe: Observer | None = None) -> None:
        self.app = app
        self.observe = observe
        self.log = structlog.get_logger("gateway.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = RequestInfo(_request_id(scope))
        token = current.set(info)
        start = time.perf_counter()
        status = 500
        header = (b"x-request-id", info.request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            if info.disconnected:
                status = 499
            if self.observe is not None:
                self.observe(scope, info, status, seconds)
            self.log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                endpoint=info.endpoint or None,
                status=status,
                ms=round(seconds * 1000, 2),
                cache=info.cache or None,
                complete=info.complete,
                calls=info.calls or None,
            )
            current.reset(token)
