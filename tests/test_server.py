"""The HTTP protocol `gateway serve` runs: uvicorn's httptools protocol writing each response in
one system call. A real uvicorn server on a loopback port, its transport's writes recorded."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.edge.limits import ConnectionLimits
from gateway.edge.server import (
    UVICORN_PRIVATE,
    HeadWithBody,
    OneWriteHttpToolsProtocol,
    http_protocol,
)
from tests.support import free_port

WRITES: list[bytes] = []


class Recorder:
    """A transport that records what is written to it, and passes everything on."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class RecordedProtocol(OneWriteHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(Recorder(transport))  # type: ignore[arg-type]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/upload":
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        reply = b"got " + body
    elif scope["path"] == "/slow":
        await asyncio.sleep(0.6)
        reply = b"slow"
    else:
        reply = b"hello"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(reply)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if scope["path"] == "/fails":
        raise RuntimeError("the app fails after starting its answer")
    await send({"type": "http.response.body", "body": reply})


@asynccontextmanager
async def server(
    limits: ConnectionLimits | None = None, protocol: Any = None
) -> AsyncIterator[int]:
    port = free_port()
    protocol = protocol or RecordedProtocol
    if limits is not None:
        protocol = functools.partial(protocol, limits=limits)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", http=protocol)
    srv = uvicorn.Server(config)
    srv.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        assert not task.done()
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


async def exchange(port: int, request: bytes, expect_continue: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if expect_continue:
            head, body = request.split(b"\r\n\r\n", 1)
            writer.write(head + b"\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(body)
        else:
            writer.write(request)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def test_gateway_serve_uses_the_one_write_protocol() -> None:
    # If uvicorn ever drops the hook, this says so instead of silently writing twice.
    assert http_protocol() is OneWriteHttpToolsProtocol
    assert callable(getattr(HttpToolsProtocol, "_start_asgi_task", None))
    limited = http_protocol(ConnectionLimits(max_connections=5))
    assert isinstance(limited, functools.partial) and limited.func is OneWriteHttpToolsProtocol


class Inspecting(RecordedProtocol):
    """Records, while serving a request, which of `UVICORN_PRIVATE` its objects lack."""

    missing: list[str] = []

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        found = {
            "HttpToolsProtocol": self,
            "RequestResponseCycle": self.cycle,
            "FlowControl": self.flow,
        }
        assert set(found) == set(UVICORN_PRIVATE)
        for owner, names in UVICORN_PRIVATE.items():
            assert type(found[owner]).__name__ in (owner, type(self).__name__)
            Inspecting.missing += [f"{owner}.{n}" for n in names if not hasattr(found[owner], n)]


async def test_every_private_name_of_uvicorn_the_protocol_uses_still_exists() -> None:
    # The protocol subclasses uvicorn's and reads its undocumented state: a release that renames
    # any of it fails here by name, not somewhere in a limit or a write.
    assert list(inspect.signature(HttpToolsProtocol.__init__).parameters) == [
        "self",
        "config",
        "server_state",
        "app_state",
        "_loop",
    ]
    Inspecting.missing.clear()
    async with server(protocol=Inspecting) as port:
        got = await exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert got.endswith(b"hello")
    assert Inspecting.missing == []
    assert "_start_asgi_task" in vars(HttpToolsProtocol)  # overridden, so it must be uvicorn's


async def test_a_response_leaves_in_one_write() -> None:
    WRITES.clear()
    async with server() as port:
        got = await exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nhello")
    assert WRITES == [got]


async def test_keep_alive_responses_each_leave_in_one_write() -> None:
    WRITES.clear()
    async with server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.close()
    assert len(WRITES) == 3 and all(w.endswith(b"hello") for w in WRITES)


async def test_an_interim_100_continue_is_not_held() -> None:
    WRITES.clear()
    request = (
        b"POST /upload HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 3\r\n"
        b"connection: close\r\n\r\nabc"
    )
    async with server() as port:
        got = await exchange(port, request, expect_continue=True)
    assert got.endswith(b"got abc")
    assert WRITES[0] == b"HTTP/1.1 100 Continue\r\n\r\n" and WRITES[1] == got


async def test_an_app_failing_after_its_head_still_gets_the_head_out_before_the_close() -> None:
    WRITES.clear()
    async with server() as port:
        got = await exchange(port, b"GET /fails HTTP/1.1\r\nhost: x\r\n\r\n")
    # What plain uvicorn sends too: the head, then the connection closes (no body).
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n")
    assert WRITES == [got]


class Sink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@pytest.mark.parametrize(
    ("sent", "written"),
    [
        ([b"HTTP/1.1 200 OK\r\n\r\n", b"body"], [b"HTTP/1.1 200 OK\r\n\r\nbody"]),
        ([b"HTTP/1.1 304 Not Modified\r\n\r\n", b""], [b"HTTP/1.1 304 Not Modified\r\n\r\n"]),
        ([b"HTTP/1.1 100 Continue\r\n\r\n"], [b"HTTP/1.1 100 Continue\r\n\r\n"]),
        ([b"5\r\nhello\r\n", b"0\r\n\r\n"], [b"5\r\nhello\r\n", b"0\r\n\r\n"]),
    ],
)
def test_head_with_body_joins_only_a_head_and_what_follows_it(
    sent: list[bytes], written: list[bytes]
) -> None:
    sink = Sink()
    transport = HeadWithBody(sink)  # type: ignore[arg-type]
    for data in sent:
        transport.write(data)
    assert sink.writes == written
    assert transport.is_closing() is False  # everything else is the real transport's


async def read_until_closed(reader: asyncio.StreamReader, within_s: float) -> tuple[bytes, float]:
    """Return what the server sent until it closed, and after how many seconds it did."""
    started = time.monotonic()
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), within_s):
            got += chunk
    except ConnectionError:
        pass
    return got, time.monotonic() - started


SMALL = ConnectionLimits(max_header_bytes=4096, header_timeout_s=0.3, body_timeout_s=0.3)


async def test_a_head_over_the_limit_is_refused_431_before_the_app_sees_it() -> None:
    async with server(SMALL) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n")
        got, _ = await read_until_closed(reader, 5)
        writer.close()
    assert got.startswith(b"HTTP/1.1 431 ") and b"connection: close" in got
    assert got.endswith(b'{"error":{"status":431,"message":"request head too large"}}')


async def test_heads_within_the_limit_are_served_whatever_follows_them_in_the_same_read() -> None:
    head = b"POST /upload HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * 3000
    body = b"b" * 200_000
    request = head + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    pipelined = b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * 1000 + b"\r\n\r\n"
    async with server(SMALL) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)  # one write: the head's end and a large body in the same reads
        resp = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert resp.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(4 + len(body)), 5) == b"got " + body
        writer.write(pipelined * 10)  # ten heads, 10 kB in all: each under the limit
        for _ in range(10):
            resp = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert resp.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.close()


async def test_a_head_or_a_body_not_complete_in_time_gets_408_and_a_close() -> None:
    async with server(SMALL) as port:
        for partial in (
            b"GET / HTTP/1.1\r\nhost: x\r\n",
            b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(partial)
            got, after = await read_until_closed(reader, 5)
            writer.close()
            assert got.startswith(b"HTTP/1.1 408 ") and after < 3, (got, after)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got, after = await read_until_closed(reader, 5)  # never asked: closed, no answer
        writer.close()
        assert got == b"" and after < 3


async def test_the_timeout_is_per_head_not_per_response_nor_per_connection() -> None:
    async with server(SMALL) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in (b"/slow", b"/", b"/slow"):  # each answer takes longer than the timeout
            for part in (b"GET " + path + b" HTTP/1.1\r\n", b"host: x\r\n", b"\r\n"):
                writer.write(part)  # a head in three parts, each well within the timeout
                await asyncio.sleep(0.05)
            resp = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert resp.startswith(b"HTTP/1.1 200 ")
            await asyncio.wait_for(reader.readexactly(4 if path == b"/slow" else 5), 5)
            await asyncio.sleep(0.4)  # idle between requests: keep-alive's time, not the head's
        writer.close()


async def test_connections_beyond_the_cap_get_503_at_once_and_the_cap_frees_on_close() -> None:
    async with server(ConnectionLimits(max_connections=2)) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got, after = await read_until_closed(reader, 5)
        writer.close()
        assert got.startswith(b"HTTP/1.1 503 ") and after < 3
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        got = await exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert got.endswith(b"hello")
