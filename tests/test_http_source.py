"""upstreams/http.py against a real loopback server, once per client (aiohttp, httpx)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import respx
from aiohttp import web

from cache.directives import Directed, Directives
from gateway.core.errors import BadPayload, NotFound, SourceTimeout, SourceUnavailable
from gateway.core.templates import parse
from gateway.core.types import Call, Upstream
from gateway.demo.simulator import (
    UpstreamServer,
    chunked,
    echo,
    hang,
    json_body,
    raw,
    reset_mid_body,
    stall_mid_body,
    truncated,
)
from tests.payloads import HOSTILE
from tests.support import Client, Start, free_port
from upstreams.decode import SLICE_BYTES
from upstreams.http import (
    HttpPoolSettings,
    HttpSettings,
    Propagation,
    http_source,
)


def call(target: str, params: Mapping[str, Any] | None = None, **fields: Any) -> Call:
    """Return a call of `target` with a 5 s deadline from now."""
    deadline = asyncio.get_running_loop().time() + 5.0
    return Call(
        source="test",
        name="c",
        target=target,
        params=params or {},
        timeout=5.0,
        deadline=deadline,
        **fields,
    )


@pytest.fixture
async def source(server: UpstreamServer, start: Start) -> Upstream:
    return await start(server.url)


# --- answers -----------------------------------------------------------------------------------


async def test_ok_json_is_decoded(server: UpstreamServer, source: Upstream) -> None:
    server.route("/prices/42", json_body({"currency": "USD", "amount": 19.99}))
    assert await source.call(call("/prices/42")) == {"currency": "USD", "amount": 19.99}


async def test_gzip_body_is_decompressed(server: UpstreamServer, source: Upstream) -> None:
    server.route("/z", raw(gzip.compress(b'{"a": [1, 2]}'), headers={"Content-Encoding": "gzip"}))
    assert await source.call(call("/z")) == {"a": [1, 2]}


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
async def test_deflate_body_is_decompressed(
    server: UpstreamServer, source: Upstream, wbits: int
) -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = packer.compress(b'{"a": [1, 2]}') + packer.flush()
    server.route("/z", raw(body, headers={"Content-Encoding": "deflate"}))
    assert await source.call(call("/z")) == {"a": [1, 2]}


async def test_gzip_body_of_several_members_is_decompressed(
    server: UpstreamServer, source: Upstream
) -> None:
    body = gzip.compress(b'{"a": ') + gzip.compress(b"[1, 2]}") + b"\0" * 8
    server.route("/z", raw(body, headers={"Content-Encoding": "x-gzip"}))
    assert await source.call(call("/z")) == {"a": [1, 2]}


@pytest.mark.parametrize("cut", [5, 20, -4], ids=["in-header", "in-data", "in-trailer"])
async def test_truncated_or_corrupt_gzip_body_is_bad_payload(
    server: UpstreamServer, source: Upstream, cut: int
) -> None:
    body = gzip.compress(b'{"a": "' + b"x" * 200 + b'"}')
    server.route("/cut", raw(body[:cut], headers={"Content-Encoding": "gzip"}))
    server.route("/bad", raw(body[:10] + b"\xff" * 30, headers={"Content-Encoding": "gzip"}))
    for target in ("/cut", "/bad"):
        with pytest.raises(BadPayload):
            await source.call(call(target))


async def test_large_compressed_body_is_inflated_in_slices(
    server: UpstreamServer, start: Start
) -> None:
    # 8 MB of blanks is 8 KB of gzip, one network read: only slicing lets the loop run meanwhile.
    inflated = 8 * 1024 * 1024
    body = gzip.compress(b"[1]" + b" " * inflated, 1)
    server.route("/big", raw(body, headers={"Content-Encoding": "gzip"}))
    upstream = await start(server.url, max_bytes=inflated + 3)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        assert await upstream.call(call("/big")) == [1]
    finally:
        ticker.cancel()
    assert ticks >= inflated // SLICE_BYTES - 2


async def test_chunked_body_within_limit_is_decoded(
    server: UpstreamServer, source: Upstream
) -> None:
    server.route("/c", chunked([b'{"a":', b" 1,", b' "b": null}']))
    assert await source.call(call("/c")) == {"a": 1, "b": None}


async def test_no_content_is_none(server: UpstreamServer, source: Upstream) -> None:
    server.route("/empty", raw(b"", status=204))
    assert await source.call(call("/empty")) is None


async def test_base_url_path_prefix_is_kept(server: UpstreamServer, start: Start) -> None:
    server.route("/api/v1/", echo())
    upstream = await start(server.url + "/api/v1")
    assert (await upstream.call(call("/x")))["target"] == "/api/v1/x"


# --- failures ----------------------------------------------------------------------------------


async def test_404_raises_not_found(server: UpstreamServer, source: Upstream) -> None:
    server.route("/prices/", json_body({"error": "no such price"}, status=404))
    with pytest.raises(NotFound):
        await source.call(call("/prices/1"))


@pytest.mark.parametrize("status", [500, 502, 503, 429, 400])
async def test_failure_status_raises_source_unavailable_with_status(
    server: UpstreamServer, source: Upstream, status: int
) -> None:
    server.route("/p", json_body({"error": "down"}, status=status))
    with pytest.raises(SourceUnavailable) as info:
        await source.call(call("/p"))
    assert info.value.status == status
    assert not info.value.connect


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (("max-age=30",), Directives(max_age_s=30)),
        (("private", "max-age=5"), Directives(private=True, max_age_s=5)),  # two field lines
        (("no-store",), Directives(no_store=True)),
    ],
)
async def test_cache_control_comes_back_with_the_value(
    server: UpstreamServer, source: Upstream, values: tuple[str, ...], expected: Directives
) -> None:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.json_response({"a": 1})
        for value in values:
            resp.headers.add("Cache-Control", value)
        return resp

    server.route("/p", handle)
    got = await source.call(call("/p"))
    assert type(got) is Directed and got.value == {"a": 1} and got.directives == expected


@pytest.mark.parametrize("header", [{}, {"Cache-Control": "public"}, {"Cache-Control": "x=1"}])
async def test_a_value_without_directives_that_count_comes_back_plain(
    server: UpstreamServer, source: Upstream, header: dict[str, str]
) -> None:
    server.route("/p", json_body({"a": 1}, headers=header))
    assert await source.call(call("/p")) == {"a": 1}


async def test_redirect_is_not_followed(server: UpstreamServer, source: Upstream) -> None:
    server.route("/old", raw(b"", status=302, headers={"Location": "http://127.0.0.1:9/new"}))
    with pytest.raises(SourceUnavailable) as info:
        await source.call(call("/old"))
    assert info.value.status == 302
    assert len(server.seen) == 1


async def test_connection_refused_is_connect_failure(start: Start) -> None:
    upstream = await start(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SourceUnavailable) as info:
        await upstream.call(call("/p"))
    assert info.value.connect
    assert info.value.status is None


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"a": 1', b"", b"\xff\xfe"])
async def test_undecodable_body_is_bad_payload(
    server: UpstreamServer, source: Upstream, body: bytes
) -> None:
    server.route("/g", raw(body))
    with pytest.raises(BadPayload):
        await source.call(call("/g"))


async def test_body_over_max_bytes_is_bad_payload(server: UpstreamServer, start: Start) -> None:
    server.route("/big", json_body(list(range(1000))))
    upstream = await start(server.url, max_bytes=1000)
    with pytest.raises(BadPayload):
        await upstream.call(call("/big"))


async def test_declared_length_over_max_bytes_is_refused_before_reading(
    server: UpstreamServer, start: Start
) -> None:
    # The server declares 10 MB, sends a few bytes and stalls: only the header can end this call.
    server.route("/big", stall_mid_body(30, declared=10_000_000))
    upstream = await start(server.url, max_bytes=1000)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BadPayload):
        async with asyncio.timeout(10):
            await upstream.call(call("/big"))
    assert loop.time() - began < 5


async def test_chunked_body_over_max_bytes_stops_reading(
    server: UpstreamServer, start: Start
) -> None:
    # Streaming all of it would take over 10 s; the call must give up after ~1000 bytes.
    server.route("/stream", chunked([b"[" + b" " * 99] + [b" " * 100] * 1000, pause_s=0.01))
    upstream = await start(server.url, max_bytes=1000)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BadPayload):
        async with asyncio.timeout(20):
            await upstream.call(call("/stream"))
    assert loop.time() - began < 5


@pytest.mark.parametrize("handler", [reset_mid_body(), truncated()], ids=["reset", "truncated"])
async def test_broken_body_is_source_unavailable(
    server: UpstreamServer, source: Upstream, handler: Any
) -> None:
    server.route("/broken", handler)
    with pytest.raises(SourceUnavailable) as info:
        async with asyncio.timeout(10):
            await source.call(call("/broken"))
    assert info.value.status is None


async def test_hanging_server_lets_outer_timeout_through(
    server: UpstreamServer, source: Upstream
) -> None:
    server.route("/hang", hang())
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await source.call(call("/hang"))
    assert loop.time() - began < 2


async def test_target_without_leading_slash_is_refused(source: Upstream) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        await source.call(call("@evil.example/x"))


# --- what the server receives ------------------------------------------------------------------


async def test_headers_reach_the_server(server: UpstreamServer, start: Start) -> None:
    server.route("/h", json_body({}))
    upstream = await start(
        server.url, headers={"Authorization": "Bearer dev", "X-Static": "source"}
    )
    await upstream.call(
        call("/h", request_id="req-123", headers={"x-static": "call", "X-Call": "yes"})
    )
    headers = server.seen[-1].headers
    assert headers["Authorization"] == "Bearer dev"
    assert headers.getall("X-Static") == ["call"]
    assert headers["X-Call"] == "yes"
    assert headers["X-Request-ID"] == "req-123"
    assert 3000 <= int(headers["X-Request-Deadline-Ms"]) <= 5000


async def test_expired_deadline_is_sent_as_zero_and_empty_request_id_is_omitted(
    server: UpstreamServer, source: Upstream
) -> None:
    server.route("/h", json_body({}))
    past = asyncio.get_running_loop().time() - 1.0
    await source.call(
        Call(source="test", name="c", target="/h", params={}, timeout=1.0, deadline=past)
    )
    headers = server.seen[-1].headers
    assert headers["X-Request-Deadline-Ms"] == "0"
    assert "X-Request-ID" not in headers


async def test_propagation_header_names_come_from_the_config(
    server: UpstreamServer, client: Client
) -> None:
    server.route("/h", json_body({}))
    names = Propagation(request_id_header="X-Trace", deadline_header="X-Budget-Ms")
    cfg = HttpSettings(base_url=server.url, client=client, propagation=names)
    upstream = await http_source("test", cfg)
    try:
        await upstream.call(call("/h", request_id="req-9"))
    finally:
        await upstream.close()
    headers = server.seen[-1].headers
    assert headers["X-Trace"] == "req-9"
    assert 3000 <= int(headers["X-Budget-Ms"]) <= 5000
    assert "X-Request-ID" not in headers and "X-Request-Deadline-Ms" not in headers


@pytest.mark.parametrize("value", HOSTILE)
async def test_path_value_stays_one_segment_on_the_same_host(
    server: UpstreamServer, source: Upstream, value: str
) -> None:
    server.route("/prices/", json_body({}))
    target = parse("/prices/{id}").render_path({"id": value})
    await source.call(call(target))
    seen = server.seen[-1]
    assert seen.headers["Host"] == server.url.removeprefix("http://")
    assert seen.path == target
    segments = seen.path.split("/")
    assert segments[:2] == ["", "prices"] and len(segments) == 3
    assert unquote(segments[2]) == value
    assert seen.query == ""
    assert "X-Injected" not in seen.headers


@pytest.mark.parametrize("value", HOSTILE)
async def test_query_value_stays_one_parameter(
    server: UpstreamServer, source: Upstream, value: str
) -> None:
    server.route("/search", json_body({}))
    await source.call(call("/search", {"q": value}))
    seen = server.seen[-1]
    assert seen.path == "/search"
    pairs = [part.split("=") for part in seen.query.split("&")]
    assert len(pairs) == 1 and len(pairs[0]) == 2
    assert pairs[0][0] == "q" and unquote(pairs[0][1]) == value
    assert "X-Injected" not in seen.headers


async def test_query_scalars_are_rendered_as_text(server: UpstreamServer, source: Upstream) -> None:
    server.route("/search", json_body({}))
    await source.call(call("/search?fixed=1", {"n": 7, "on": True, "x": 1.5, "k y": "v"}))
    assert server.seen[-1].query == "fixed=1&n=7&on=true&x=1.5&k%20y=v"


# --- cancellation and the pool -----------------------------------------------------------------


@pytest.mark.parametrize("stage", ["before-headers", "mid-body"])
async def test_cancelled_call_leaves_the_pool_answering_correctly(
    server: UpstreamServer, start: Start, stage: str
) -> None:
    # mid-body: the rest of the cancelled answer still arrives later on that connection; one
    # pooled connection means any reuse of it would hand those bytes to the next call.
    if stage == "before-headers":
        server.route("/slow", hang())
    else:
        server.route("/slow", chunked([b'{"stale": ', b"true}"], pause_s=0.3))
    server.route("/echo/", echo())
    upstream = await start(server.url, pool=HttpPoolSettings(max=1))
    task = asyncio.ensure_future(upstream.call(call("/slow")))
    await server.wait_seen(1)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(20):
        results = await asyncio.gather(*(upstream.call(call(f"/echo/{i}")) for i in range(50)))
    assert [r["target"] for r in results] == [f"/echo/{i}" for i in range(50)]
    await asyncio.sleep(0.4)  # past the stale tail of the cancelled answer
    assert (await upstream.call(call("/echo/last")))["target"] == "/echo/last"
    assert upstream.pool_stats()["in_use"] == 0


async def test_concurrent_calls_share_the_pool(server: UpstreamServer, start: Start) -> None:
    server.route("/echo/", echo())
    upstream = await start(server.url, pool=HttpPoolSettings(max=4))
    async with asyncio.timeout(20):
        results = await asyncio.gather(*(upstream.call(call(f"/echo/{i}")) for i in range(50)))
    assert [r["target"] for r in results] == [f"/echo/{i}" for i in range(50)]
    stats = upstream.pool_stats()
    assert stats["limit"] == 4 and stats["in_use"] == 0 and 1 <= stats["idle"] <= 4


async def test_pool_stats_count_in_use_and_idle(server: UpstreamServer, start: Start) -> None:
    server.route("/hang", hang())
    server.route("/ok", json_body({}))
    upstream = await start(server.url, pool=HttpPoolSettings(max=7))
    assert upstream.pool_stats() == {"limit": 7, "in_use": 0, "idle": 0}
    await upstream.call(call("/ok"))
    assert upstream.pool_stats() == {"limit": 7, "in_use": 0, "idle": 1}
    task = asyncio.ensure_future(upstream.call(call("/hang")))
    await server.wait_seen(2)
    assert upstream.pool_stats() == {"limit": 7, "in_use": 1, "idle": 0}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_close_drops_the_pooled_connections(server: UpstreamServer, start: Start) -> None:
    server.route("/ok", json_body({}))
    upstream = await start(server.url)
    await upstream.call(call("/ok"))
    await upstream.close()
    assert upstream.pool_stats()["idle"] == 0


async def test_httpx_with_http2_enabled_still_speaks_http1_to_plain_http(
    server: UpstreamServer,
) -> None:
    # Without TLS there is no ALPN, so httpx falls back to HTTP/1.1 rather than failing.
    server.route("/ok", json_body({"v": 2}))
    cfg = HttpSettings(base_url=server.url, client="httpx", http2=True)
    upstream = await http_source("h2", cfg)
    try:
        assert await upstream.call(call("/ok")) == {"v": 2}
    finally:
        await upstream.close()


# --- ping --------------------------------------------------------------------------------------


async def test_ping_counts_any_answer_as_reachable(
    server: UpstreamServer, source: Upstream
) -> None:
    await source.ping()  # no route for "/": the server answers 404
    assert server.seen[-1].path == "/"


async def test_ping_of_a_closed_port_is_a_connect_failure(start: Start) -> None:
    upstream = await start(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SourceUnavailable) as info:
        await upstream.ping()
    assert info.value.connect


async def test_ping_of_a_hanging_server_times_out_within_a_second(
    server: UpstreamServer, source: Upstream
) -> None:
    server.route("/", hang())
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(SourceTimeout):
        await source.ping()
    assert loop.time() - began < 3


# --- httpx, unit tests with respx --------------------------------------------------------------

MOCK_BASE = "http://127.0.0.1:9"


@pytest.fixture
async def httpx_source() -> AsyncIterator[Upstream]:
    cfg = HttpSettings(base_url=MOCK_BASE, client="httpx")
    upstream = await http_source("mocked", cfg)
    yield upstream
    await upstream.close()


@pytest.mark.parametrize(
    ("status", "error"), [(404, NotFound), (503, SourceUnavailable), (504, SourceUnavailable)]
)
async def test_httpx_status_mapping(
    httpx_source: Upstream, status: int, error: type[Exception]
) -> None:
    with respx.mock(assert_all_called=True) as mock:
        mock.get(f"{MOCK_BASE}/p").respond(status, json={"error": "x"})
        with pytest.raises(error):
            await httpx_source.call(call("/p"))


async def test_httpx_json_decode(httpx_source: Upstream) -> None:
    with respx.mock() as mock:
        mock.get(f"{MOCK_BASE}/ok").respond(200, json={"a": [1, "b", None]})
        mock.get(f"{MOCK_BASE}/bad").respond(200, content=b"not json")
        assert await httpx_source.call(call("/ok")) == {"a": [1, "b", None]}
        with pytest.raises(BadPayload):
            await httpx_source.call(call("/bad"))


async def test_httpx_sends_the_raw_path_and_escaped_query(httpx_source: Upstream) -> None:
    target = parse("/prices/{id}").render_path({"id": "a/b/../c"})
    with respx.mock() as mock:
        route = mock.route().respond(200, json={})
        await httpx_source.call(call(target, {"q": "x&y=z"}))
    assert route.calls.last.request.url.raw_path == b"/prices/a%2Fb%2F..%2Fc?q=x%26y%3Dz"


@pytest.mark.parametrize(
    ("driver_error", "connect"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.RemoteProtocolError("reset"), False),
        (httpx.ReadError("gone"), False),
    ],
)
async def test_httpx_driver_errors_are_translated(
    httpx_source: Upstream, driver_error: Exception, connect: bool
) -> None:
    with respx.mock() as mock:
        mock.get(f"{MOCK_BASE}/p").mock(side_effect=driver_error)
        with pytest.raises(SourceUnavailable) as info:
            await httpx_source.call(call("/p"))
    assert info.value.connect is connect
    assert info.value.__cause__ is driver_error
