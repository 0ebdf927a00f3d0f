"""Request size limits: a pure-ASGI middleware that refuses oversized headers and bodies.

The head's size is first bounded by the protocol `gateway serve` runs (gateway/edge/server.py counts
its bytes as they arrive, before httptools buffers them); the check here holds under any other
ASGI server too. Bodies are left to the app by uvicorn, and FastAPI reads a whole body before a
route's dependencies run (the admin token check among them). Nothing the gateway serves takes
more than a small JSON body.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024


class RequestLimits:
    """Refuse headers over `max_header_bytes` (431) and bodies over `max_body_bytes` (413)."""

    def __init__(
        self,
        app: ASGIApp,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        if sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            await _refuse(send, 431, "request headers too large")
            return
        length = b""
        chunked = False
        for k, v in headers:
            if k == b"content-length":
                length = v
            elif k == b"transfer-encoding":
                chunked = True
        if not length and not chunked:
            await self.app(scope, receive, send)  # no body: the hot path pays nothing more
            return
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _refuse(send, 413, "request body too large")
            return
        # Read the body here, bounded, then hand it to the app as it came.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await _refuse(send, 413, "request body too large")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": {"status": status, "message": message}})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client connection may cost, per process (`server:` in gateway.yaml)."""

    max_connections: int = 1024
    max_header_bytes: int = MAX_HEADER_BYTES
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keepalive_s: float = 5.0
    drain_s: float = 10.0


DEFAULT_LIMITS = ConnectionLimits()
