"""Hostile upstreams against the HTTP adapter and its policies, each on a real loopback server:
cookies that must never travel back, decompression bombs, stacked encodings, and 400s that must
not open a breaker (issue 10, items 2, 6 and 7)."""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.config.kinds import HttpSourceConfig
from gateway.core.errors import BadPayload, SourceError, SourceUnavailable
from gateway.core.plan import Guarded, guard
from gateway.core.types import Call, Upstream
from gateway.demo.simulator import UpstreamServer, echo, gzip_bomb, json_body, raw, set_cookies
from tests.support import Client, Start

BOMB_BYTES = 900 * 1024 * 1024  # what the bomb inflates to; it is ~0.9 MB on the wire
MAX_GROWTH_KB = 40 * 1024  # "a few MB" with a wide margin: the bomb itself is 0.9 MB here
MAX_LAG_S = 0.4  # the guarantee is 50 ms; this bound only has to hold on a busy shared box


def call(target: str) -> Call:
    """Return a call of `target` with a 10 s deadline from now."""
    deadline = asyncio.get_running_loop().time() + 10.0
    return Call(source="up", name="c", target=target, params={}, timeout=10.0, deadline=deadline)


# --- item 2: nothing an upstream answered is ever sent on a later call -------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_set_cookie_from_an_upstream_is_never_sent_back(
    server: UpstreamServer, start: Start, host: str
) -> None:
    server.route("/login", set_cookies(json_body({"ok": True})))
    server.route("/next", echo())
    upstream = await start(server.url.replace("127.0.0.1", host))
    for _ in range(3):
        assert await upstream.call(call("/login")) == {"ok": True}
    # Concurrent calls too: a jar cleared between calls would still leak inside this burst.
    await asyncio.gather(*(upstream.call(call(p)) for p in ["/login", "/next"] * 10))
    answers = [await upstream.call(call("/next")) for _ in range(3)]
    assert all("Cookie" not in a["headers"] for a in answers)
    assert [s.target for s in server.seen if "Cookie" in s.headers] == []


async def test_a_cookie_the_config_sets_is_still_sent(server: UpstreamServer, start: Start) -> None:
    server.route("/login", set_cookies(json_body({"ok": True})))
    server.route("/next", echo())
    upstream = await start(server.url, headers={"Cookie": "tenant=acme"})
    await upstream.call(call("/login"))
    assert (await upstream.call(call("/next")))["headers"]["Cookie"] == "tenant=acme"


# --- item 6: the decoded size is bounded by max_bytes, counted as it leaves the decoder -------


@contextmanager
def peak_rss_growth_kb() -> Iterator[list[int]]:
    """Measure the growth of this process's peak RSS over the block; the figure lands in [0]."""
    out = [0]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kb("VmHWM")
    yield out
    out[0] = _status_kb("VmHWM") - before


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@contextmanager
def loop_lag() -> Iterator[list[float]]:
    """Measure the longest gap between wakeups of a 5 ms ticker over the block, in [0]."""
    out = [0.0]

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            out[0] = max(out[0], now - last)
            last = now

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        yield out
    finally:
        ticker.cancel()


def bomb_route(body: bytes, encoding: str) -> Callable[[web.BaseRequest], Awaitable[Any]]:
    return raw(body, headers={"Content-Encoding": encoding})


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb(BOMB_BYTES)


async def test_gzip_bomb_is_bad_payload_within_a_few_mb_and_no_loop_stall(
    server: UpstreamServer, start: Start, bomb: bytes, client: Client
) -> None:
    server.route("/bomb", bomb_route(bomb, "gzip"))
    server.route("/ok", json_body({"ok": 1}))
    upstream = await start(server.url)  # max_bytes: the default 1 MiB; the bomb's length fits
    with peak_rss_growth_kb() as growth, loop_lag() as lag:
        for _ in range(3):
            with pytest.raises(BadPayload, match="max_bytes"):
                await upstream.call(call("/bomb"))
            await asyncio.sleep(0.02)
    print(
        f"\n{client}: gzip bomb x3: peak RSS +{growth[0]} KB, max loop lag {lag[0] * 1000:.1f} ms"
    )
    assert growth[0] < MAX_GROWTH_KB
    assert lag[0] < MAX_LAG_S
    assert await upstream.call(call("/ok")) == {"ok": 1}  # the pool still answers correctly


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
async def test_deflate_bomb_is_bad_payload_within_a_few_mb(
    server: UpstreamServer, start: Start, wbits: int
) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    body = b"".join(packer.compress(bytes(1 << 20)) for _ in range(200)) + packer.flush()
    server.route("/bomb", bomb_route(body, "deflate"))
    upstream = await start(server.url)
    with peak_rss_growth_kb() as growth:
        with pytest.raises(BadPayload, match="max_bytes"):
            await upstream.call(call("/bomb"))
    assert growth[0] < MAX_GROWTH_KB


async def test_decoded_size_counts_against_max_bytes(server: UpstreamServer, start: Start) -> None:
    doc = b'{"pad": "' + b" " * 5000 + b'"}'
    server.route("/small", raw(gzip.compress(doc), headers={"Content-Encoding": "gzip"}))
    assert len(gzip.compress(doc)) < 1000 < len(doc)
    upstream = await start(server.url, max_bytes=1000)
    with pytest.raises(BadPayload, match="max_bytes"):
        await upstream.call(call("/small"))
    roomy = await start(server.url, max_bytes=len(doc))
    assert (await roomy.call(call("/small")))["pad"] == " " * 5000


@pytest.mark.parametrize(
    "encoding", ["gzip, gzip", "deflate, gzip", "compress", "br", "zstd", "x-unknown"]
)
async def test_stacked_or_unknown_content_encoding_is_bad_payload(
    server: UpstreamServer, start: Start, encoding: str
) -> None:
    server.route(
        "/enc", raw(gzip.compress(gzip.compress(b"{}")), headers={"Content-Encoding": encoding})
    )
    upstream = await start(server.url)
    with pytest.raises(BadPayload, match="Content-Encoding"):
        await upstream.call(call("/enc"))


async def test_two_content_encoding_headers_are_bad_payload(
    server: UpstreamServer, start: Start
) -> None:
    headers = CIMultiDict([("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")])
    server.route("/enc", raw(gzip.compress(gzip.compress(b"{}")), headers=headers))
    upstream = await start(server.url)
    with pytest.raises(BadPayload, match="Content-Encoding"):
        await upstream.call(call("/enc"))


async def test_accept_encoding_names_only_what_can_be_decoded(
    server: UpstreamServer, start: Start
) -> None:
    server.route("/", echo())
    upstream = await start(server.url)
    sent = (await upstream.call(call("/x")))["headers"]["Accept-Encoding"]
    assert {e.strip() for e in sent.split(",")} == {"gzip", "deflate"}


# --- item 7: answers that refuse one call are not a sick source ------------------------------


def guarded(upstream: Upstream, url: str, client: Client) -> Guarded:
    """Return `upstream` behind the gateway's policies: retries on `error`, and a breaker."""
    cfg = HttpSourceConfig.model_validate(
        {
            "kind": "http",
            "base_url": url,
            "client": client,
            "timeout_ms": 1000,
            "retry": {"attempts": 3, "backoff_ms": 1, "on": ["error", "timeout", 429, 503]},
            "breaker": {"min_calls": 20, "failure_ratio": 0.5, "open_ms": 60_000},
        }
    )
    return guard("up", cfg, upstream)


@pytest.mark.parametrize("status", [400, 401, 403, 405, 409, 410, 413, 422, 451])
async def test_client_errors_neither_open_the_breaker_nor_are_retried(
    server: UpstreamServer, start: Start, client: Client, status: int
) -> None:
    server.route("/bad", json_body({"error": "bad request"}, status=status))
    server.route("/good", json_body({"ok": True}))
    g = guarded(await start(server.url), server.url, client)
    for _ in range(40):
        with pytest.raises(SourceUnavailable) as info:
            await g.call(call("/bad"))
        assert info.value.outcome == "error" and info.value.status == status
    assert g.breaker is not None and g.breaker.state == "closed"
    assert len(server.seen) == 40  # "error" is in retry.on, yet not one 4xx was sent twice
    assert await g.call(call("/good")) == {"ok": True}


@pytest.mark.parametrize("status", [500, 503, 429, 408])
async def test_server_errors_still_open_the_breaker(
    server: UpstreamServer, start: Start, client: Client, status: int
) -> None:
    server.route("/sick", json_body({"error": "down"}, status=status))
    g = guarded(await start(server.url), server.url, client)
    outcomes = []
    for _ in range(40):
        try:
            await g.call(call("/sick"))
        except SourceError as exc:
            outcomes.append(exc.outcome)
    assert g.breaker is not None and g.breaker.state == "open"
    assert outcomes[-1] == "circuit_open"


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_compressed_input_that_inflates_to_nothing_is_bounded_too(coding: str) -> None:
    # Empty gzip members (or empty deflate blocks) decode to nothing: counting decoded bytes
    # alone would read such a body until the call's timeout. The raw bytes are bounded as well.
    from upstreams.decode import read_body

    if coding == "gzip":
        head, unit = b"", gzip.compress(b"")
    else:
        z = zlib.compressobj(wbits=zlib.MAX_WBITS)
        head = z.compress(b"") + z.flush(zlib.Z_FULL_FLUSH)  # the zlib header, once
        unit = b"\x00\x00\x00\xff\xff"  # an empty, non-final stored block, as often as one likes
    sent = 0

    async def chunks() -> Any:
        nonlocal sent
        block = unit * (65536 // len(unit))
        for i in range(400):  # ~26 MB, bounded
            data = head + block if i == 0 else block
            sent += len(data)
            yield data

    with pytest.raises(BadPayload, match="max_bytes"):
        await read_body("up", chunks(), 1000, coding)
    assert sent < 1024 * 1024
