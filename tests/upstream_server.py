"""A scripted loopback HTTP server for tests: answers by path prefix and records what it received.

    async with UpstreamServer() as server:
        server.route("/prices/", json_body({"amount": 1}))
        server.route("/slow/", slow(5, json_body({})))
        ... server.url, server.seen[-1].path ...

Handlers are plain async functions of the request; the factories below build the usual ones.
The server runs on 127.0.0.1, port 0, and sees the request target exactly as sent (no router
decodes or normalizes it). Every wait is bounded and ends early when the server closes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

MAX_WAIT_S = 30.0
"""The longest any scripted wait lasts when the server is not closed first."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the server received it: the raw target (path and query, undecoded)."""

    method: str
    target: str
    headers: CIMultiDictProxy[str]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


class UpstreamServer:
    """A loopback aiohttp.web server whose answers are scripted per path prefix."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[Seen] = []
        self.closing = asyncio.Event()
        self._arrived = asyncio.Event()
        self.url = ""
        self._runner: web.ServerRunner | None = None

    def route(self, prefix: str, handler: Handler) -> None:
        """Answer requests whose raw target starts with `prefix` (the longest prefix wins)."""
        self.routes[prefix] = handler

    async def start(self) -> str:
        """Listen on 127.0.0.1 on a free port; return the base URL."""
        self._runner = web.ServerRunner(web.Server(self._handle), shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        """Release every waiting handler, then stop listening and close connections."""
        self.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_seen(self, count: int) -> None:
        """Wait until at least `count` requests have arrived (at most 5 s, then TimeoutError)."""
        async with asyncio.timeout(5.0):
            while len(self.seen) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def __aenter__(self) -> UpstreamServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.raw_path, request.headers))
        self._arrived.set()
        _serving.set(self)
        matches = [p for p in self.routes if request.raw_path.startswith(p)]
        if not matches:
            return web.Response(
                status=404, body=b'{"error": "no route"}', content_type="application/json"
            )
        return await self.routes[max(matches, key=len)](request)


# Set by the server around each handler (same task), so handlers can wait on its `closing`.
_serving: ContextVar[UpstreamServer] = ContextVar("serving")


async def idle(seconds: float) -> None:
    """Sleep up to `seconds` (at most MAX_WAIT_S), ending early when the serving server closes."""
    try:
        async with asyncio.timeout(min(seconds, MAX_WAIT_S)):
            await _serving.get().closing.wait()
    except TimeoutError:
        pass


def unused_port() -> int:
    """Return a loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- handler factories -----------------------------------------------------------------------


def json_body(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Handler:
    """Answer with `data` encoded as JSON."""
    return raw(orjson.dumps(data), status, headers)


def raw(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> Handler:
    """Answer with exactly `body` (Content-Length set), labelled as JSON."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    return handle


def echo() -> Handler:
    """Answer with the raw target and the request headers, as JSON."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({"target": request.raw_path, "headers": dict(request.headers)})

    return handle


def slow(seconds: float, then: Handler) -> Handler:
    """Wait `seconds` (bounded, ends when the server closes) before answering like `then`."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        await idle(seconds)
        return await then(request)

    return handle


def hang() -> Handler:
    """Never answer, until the server closes."""
    return slow(MAX_WAIT_S, raw(b"null"))


def chunked(chunks: list[bytes], pause_s: float = 0.0) -> Handler:
    """Stream `chunks` chunked (no Content-Length); stop quietly if the client hangs up."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for chunk in chunks:
                await resp.write(chunk)
                if pause_s:
                    await idle(pause_s)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client hung up mid-stream, which is what some tests script
        return resp

    return handle


def stall_mid_body(seconds: float, declared: int = 1000, sent: bytes = b'{"a": ') -> Handler:
    """Send headers and the start of a body, then wait `seconds` before closing the connection."""
    return _partial(declared, sent, seconds, reset=False)


def truncated(declared: int = 1000, sent: bytes = b'{"a": ') -> Handler:
    """Declare `declared` bytes, send fewer, then close the connection cleanly (FIN)."""
    return _partial(declared, sent, 0.0, reset=False)


def reset_mid_body(declared: int = 1000, sent: bytes = b'{"a": ') -> Handler:
    """Declare `declared` bytes, send fewer, then reset the connection (RST)."""
    return _partial(declared, sent, 0.0, reset=True)


def _partial(declared: int, sent: bytes, wait_s: float, reset: bool) -> Handler:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": str(declared)}
        )
        await resp.prepare(request)
        await resp.write(sent)
        # Let the client read headers and the first bytes before the connection goes.
        await idle(max(wait_s, 0.05))
        transport = request.transport
        if transport is not None:
            if reset:
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        return resp

    return handle
