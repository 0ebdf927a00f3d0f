"""The HTTP protocol the gateway serves with: uvicorn's httptools protocol, sending each
response in one write.

uvicorn writes a response's status line and headers when the app sends `http.response.start`,
and its body when the app sends `http.response.body`: two writes, two system calls, and on a
loopback or a VM network each costs tens of microseconds, as much as a cache hit's own work
(bench/RESULTS.md: 9.1 writes per response against the hand-written baseline's 6.0). Here the
head waits for the body's first write and both leave together. Every response of the gateway
sends its body right after its head, so nothing is held back for longer than that.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_STATUS_LINE = b"HTTP/1.1 "
_CONTINUE = b"HTTP/1.1 100 "


class HeadWithBody:
    """The transport one request's cycle writes to: its response head is held until the next
    write (the body's) or until the transport closes, and then written with it."""

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        """Write `data`; a response head (not an interim `100 Continue`) waits for the next."""
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(_STATUS_LINE) and not data.startswith(_CONTINUE):
            self._head = data
            return
        self._transport.write(data)

    def close(self) -> None:
        """Write a held head (an app that failed after starting its answer), then close."""
        if self._head is not None:
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, each request's cycle writing through `HeadWithBody`."""

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        cycle.transport = HeadWithBody(cycle.transport)
        super()._start_asgi_task(cycle, app)


def http_protocol() -> type[asyncio.Protocol] | str:
    """Return the protocol class for uvicorn: ours where this uvicorn has the hook it needs,
    else plain httptools (tests/test_server.py fails loudly if the hook is gone)."""
    if callable(getattr(HttpToolsProtocol, "_start_asgi_task", None)):
        return OneWriteHttpToolsProtocol
    return "httptools"
