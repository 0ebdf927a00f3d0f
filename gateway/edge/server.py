"""The HTTP protocol the gateway serves with: uvicorn's httptools protocol, sending each
response in one write.

uvicorn writes a response's status line and headers when the app sends `http.response.start`,
and its body when the app sends `http.response.body`: two writes, two system calls, and on a
loopback or a VM network each costs tens of microseconds, as much as a cache hit's own work
(bench/RESULTS.md: 9.1 writes per response against the hand-written baseline's 6.0). Here the
head waits for the body's first write and both leave together. Every response of the gateway
sends its body right after its head, so nothing is held back for longer than that.

It also bounds what one client can cost before the app sees its request (`server:` in
gateway.yaml): the bytes of a request head are counted as they arrive, before httptools buffers
them, and a head over `max_header_bytes` is answered 431 and the connection closed; a head or a
body not complete within its timeout is answered 408 and closed; a connection beyond
`max_connections` is answered 503 and closed at once, before anything is read from it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, cast

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.edge.limits import DEFAULT_LIMITS, ConnectionLimits

_STATUS_LINE = b"HTTP/1.1 "
_CONTINUE = b"HTTP/1.1 100 "

LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024
"""After refusing a request, what is still read (and dropped) before the close: a client that
sends its whole request before reading gets to read the refusal, instead of a reset."""


def _refusal(status: int, reason: bytes, message: str) -> bytes:
    body = orjson.dumps({"error": {"status": status, "message": message}})
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status,
        reason,
        len(body),
    )
    return head + b"connection: close\r\n\r\n" + body


HEAD_TOO_LARGE = _refusal(431, b"Request Header Fields Too Large", "request head too large")
TOO_SLOW = _refusal(408, b"Request Timeout", "request not received in time")
TOO_MANY = _refusal(503, b"Service Unavailable", "too many connections")


UVICORN_PRIVATE: dict[str, tuple[str, ...]] = {
    "HttpToolsProtocol": (
        "_start_asgi_task",  # the one write: each cycle's transport is wrapped as it starts
        "on_headers_complete",  # httptools' callbacks, for the head's size and timers
        "on_message_complete",
        "connections",  # the server's open connections, for `max_connections`
        "cycle",  # the request being served, and its state below
        "flow",  # read pausing, below
        "loop",
        "transport",
    ),
    "RequestResponseCycle": (
        "transport",
        "response_started",
        "response_complete",
        "disconnected",
        "message_event",
    ),
    "FlowControl": ("read_paused", "resume_reading"),
}
"""Every name of uvicorn's httptools protocol this module uses that uvicorn does not document,
by the class that has it (tests/test_server.py fails on the first one a release drops).
Kept because it pays: measured for issue 11, a cache hit costs 0.90x the CPU with the one
write than without it (bench/RESULTS.md); the limits need the subclass whatever the write."""


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
    """uvicorn's httptools protocol, each request's cycle writing through `HeadWithBody`, and
    each connection held to `limits`: its head's size, the time to send a head and a body, and
    the number of connections open at once."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._head_bytes = 0  # of the request head being read; 0 between requests
        self._in_body = False  # the head is complete, the body is not
        self._timer: asyncio.TimerHandle | None = None
        self._linger_bytes: int | None = None  # refused: what may still be read and dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport  # for connection_lost; never read, never counted
            self._linger_bytes = 0
            transport.write(TOO_MANY)
            transport.close()
            return
        super().connection_made(transport)
        # A connection that never sends a whole head is closed too (uvicorn's keep-alive timer
        # only starts after a first response).
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger_bytes is not None:
            self._linger_bytes -= len(data)
            if self._linger_bytes < 0:
                self.transport.close()
            return
        limit = self.limits.max_header_bytes
        while data:
            if self._in_body:
                # The body, and at most one read of a pipelined head behind it, uncounted.
                super().data_received(data)
                break
            room = limit - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                super().data_received(data)
                break
            # Feed only what the limit leaves; whatever is past it is never buffered.
            part, data = data[:room], data[room:]
            self._head_bytes += len(part)
            super().data_received(part)
            if self.transport.is_closing() or self._linger_bytes is not None:
                return
            if not self._in_body and self._head_bytes >= limit:
                self._refuse(HEAD_TOO_LARGE)
                return
        if self.transport.is_closing() or self._linger_bytes is not None:
            return
        if self._in_body or self._head_bytes:
            if self._timer is None:
                self._arm()
        else:
            self._disarm()

    def on_headers_complete(self) -> None:
        self._head_bytes = 0
        self._in_body = True
        self._disarm()  # the body gets its own time, from now
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        cycle.transport = HeadWithBody(cycle.transport)
        super()._start_asgi_task(cycle, app)

    def _arm(self) -> None:
        timeout = self.limits.body_timeout_s if self._in_body else self.limits.header_timeout_s
        self._timer = self.loop.call_later(timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._linger_bytes is not None:
            return
        cycle = self.cycle
        previous_in_flight = not self._in_body and cycle is not None and not cycle.response_complete
        if self.flow.read_paused or previous_in_flight:
            # Reading waits on the app (a pipelined request, a body it has not asked for yet):
            # the client is not the slow one.
            self._arm()
            return
        if not self._in_body and not self._head_bytes:
            self.transport.close()  # connected, never asked: nothing to answer
            return
        if self._in_body and cycle is not None:
            cycle.disconnected = True  # the app waiting for this body hears of it now
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._refuse(TOO_SLOW)

    def _refuse(self, answer: bytes) -> None:
        """Answer `answer` and close, reading (and dropping) a little more first."""
        self._disarm()
        cycle = self.cycle
        if not self._in_body and cycle is not None and not cycle.response_complete:
            self.transport.close()  # an answer in flight before this one: no room to say why
            return
        self._linger_bytes = LINGER_BYTES
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)


def http_protocol(limits: ConnectionLimits = DEFAULT_LIMITS) -> type[asyncio.Protocol]:
    """Return the protocol for uvicorn's `http=`: `OneWriteHttpToolsProtocol` held to `limits`
    (tests/test_server.py fails loudly if uvicorn loses the hook its one write needs)."""
    if limits == DEFAULT_LIMITS:
        return OneWriteHttpToolsProtocol
    # uvicorn only calls it; a partial of module-level names also pickles, for --workers N.
    return cast(type[asyncio.Protocol], functools.partial(OneWriteHttpToolsProtocol, limits=limits))


def uvicorn_options(server: ConnectionLimits) -> dict[str, Any]:
    """Return the uvicorn settings `server:` decides: the protocol, keep-alive and drain time."""
    return {
        "http": http_protocol(server),
        "timeout_keep_alive": server.keepalive_s,
        "timeout_graceful_shutdown": server.drain_s,
    }
