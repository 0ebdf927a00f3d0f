"""Attacks on the composite cache, each against the real app on real Redis (or memory://):
not-found answers kept for an hour, a leader's bug shared with every request of its flight,
hostile entries in Redis that inflate to hundreds of MB, and a Redis Cluster master killed
under traffic."""

from __future__ import annotations

import asyncio
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from cache.entry import decode, encode, make_entry
from gateway import edge
from gateway.app import create_app
from gateway.config import LoadedConfig
from gateway.simulator import Simulators
from tests.config_files import GENEROUS
from tests.serving import product_view_config, product_view_env, serving

PRODUCTS = 500
UNKNOWN = PRODUCTS + 1000
BUSY_HOST_OP_TIMEOUT = "op_timeout_ms: 250"
"""Gateway, services and client share this host's few CPUs: the cache's behaviour is under
test here, not a 20 ms op timeout against the host's scheduling."""


def loaded(env: Mapping[str, str], prefix: str, *cache: str) -> LoadedConfig:
    """Return the shipped gateway.yaml with generous timeouts and `cache` lines added."""
    edit = dict(GENEROUS)
    lines = (BUSY_HOST_OP_TIMEOUT, *cache)
    edit["# memory:// for the embedded default"] = "".join(f"\n  {line}" for line in lines)
    return product_view_config(env, prefix, edit)


@asynccontextmanager
async def gateway(config: LoadedConfig) -> AsyncIterator[tuple[str, list[str]]]:
    """Serve the gateway; yield its URL and the list its cache reports its events to."""
    app = create_app(loaded=config)
    async with serving(app) as url:
        cache = app.state.gateway.current().cache
        events: list[str] = []
        counted = cache.on_event

        def observe(event: str) -> None:
            events.append(event)
            if counted is not None:
                counted(event)

        cache.on_event = observe
        yield url, events


async def get(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, Mapping[str, str], bytes]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def until(condition: Callable[[], bool], what: str, within_s: float = 5.0) -> None:
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what}: not within {within_s} s")


def keys_and_ttls(redis_url: str, prefix: str) -> dict[bytes, int]:
    """Return every key under `prefix` with its PTTL (-1: no expiry)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {key: client.pttl(key) for key in client.scan_iter(match=f"{prefix}*", count=1000)}
    finally:
        client.close()


# --- item 5: not-found answers ----------------------------------------------------------------


async def test_a_not_found_answer_is_kept_not_found_ttl_s_and_every_key_written_expires(
    sims: Simulators,
    catalog_dsn: str,
    redis_url: str,
    redis_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    # The shipped config keeps answers for 60 s + 3600 s of stale windows; a 404 must not be.
    env = product_view_env(sims, catalog_dsn, redis_url)
    async with gateway(loaded(env, redis_prefix)) as (url, _):
        assert (await get(http, f"{url}/products/{UNKNOWN}"))[0] == 404
        answers = await asyncio.gather(
            *(get(http, f"{url}/products/{1 + i % 5}") for i in range(40))
        )
        assert {status for status, _, _ in answers} == {200}
        status, headers, _ = await get(http, f"{url}/products/{UNKNOWN}")
        assert (status, headers["X-Cache"]) == (404, "HIT")
    ttls = keys_and_ttls(redis_url, redis_prefix)
    assert ttls, "the cache wrote nothing under its prefix"
    assert all(ttl > 0 for ttl in ttls.values()), ttls  # entries, tag sets and locks alike
    client = redis.Redis.from_url(redis_url)
    try:
        statuses = {k: decode(client.get(k) or b"").status for k in ttls if k.endswith(b":e")}
    finally:
        client.close()
    not_found = [k for k, status in statuses.items() if status == 404]
    assert len(not_found) == 1 and sorted(set(statuses.values())) == [200, 404], statuses
    assert 0 < ttls[not_found[0]] <= 30_000  # not_found_ttl_s's default, and nothing more


# --- item 3: a leader's bug is its own --------------------------------------------------------

BUGGY = "request-with-a-bug"


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_requests_joined_to_a_flight_whose_leader_hits_a_bug_get_200(
    sims: Simulators,
    catalog_dsn: str,
    redis_url: str,
    redis_prefix: str,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    real = edge.execute
    entered, gate = asyncio.Event(), asyncio.Event()

    async def execute(plan: Any, sources: Any, params: Any, request_id: str = "", *a: Any) -> Any:
        if request_id == BUGGY:  # a bug only this request's values trigger
            entered.set()
            await gate.wait()
            raise RuntimeError("a bug in this request's own fan-out")
        return await real(plan, sources, params, request_id, *a)

    monkeypatch.setattr(edge, "execute", execute)
    cache_url = redis_url if backend == "redis" else "memory://"
    env = product_view_env(sims, catalog_dsn, cache_url)
    async with gateway(loaded(env, redis_prefix)) as (url, events):
        leader = asyncio.create_task(get(http, f"{url}/products/42", **{"X-Request-ID": BUGGY}))
        await asyncio.wait_for(entered.wait(), 5)
        followers = [asyncio.create_task(get(http, f"{url}/products/42")) for _ in range(10)]
        await until(lambda: events.count("singleflight_wait") >= 10, "10 requests joined")
        gate.set()
        assert (await leader)[0] == 500  # the bug still fails its own request loudly
        answers = await asyncio.gather(*followers)
    assert [status for status, _, _ in answers] == [200] * 10
    assert sims.counts()["pricing"] == 1  # one of them led in its place; the others shared it


# --- item 6: entries that inflate to hundreds of MB -------------------------------------------


def bomb(inflated: int) -> bytes:
    """Return a zlib stream of `inflated` zero bytes (about 1/1000 of that long)."""
    packer = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join([*(packer.compress(chunk) for _ in range(inflated >> 20)), packer.flush()])


def hostile(kind: str) -> bytes:
    """Return a stored entry, fresh and complete, whose body is a 300 MB zlib bomb (`zlib`) or
    100 MB of raw bytes (`raw`), laid out as the gateway's own codec writes entries."""
    body = b"0" * 100
    packed = zlib.compress(body, 1)
    stored = encode(make_entry(200, body, True), compress_min_bytes=0)
    assert stored.endswith(packed)
    if kind == "zlib":
        return stored[: -len(packed)] + bomb(300 << 20)
    raw = encode(make_entry(200, body, True), compress_min_bytes=len(body) + 1)
    return raw + bytes(100 << 20)


@pytest.mark.parametrize("kind", ["zlib", "raw"])
async def test_a_hostile_entry_in_redis_is_a_miss_that_costs_a_few_mb(
    sims: Simulators,
    catalog_dsn: str,
    redis_url: str,
    redis_prefix: str,
    http: aiohttp.ClientSession,
    kind: str,
) -> None:
    env = product_view_env(sims, catalog_dsn, redis_url)
    async with gateway(loaded(env, redis_prefix)) as (url, _):
        assert (await get(http, f"{url}/products/42"))[0] == 200
        client = redis.Redis.from_url(redis_url)
        try:
            (key,) = [k for k in client.scan_iter(match=f"{redis_prefix}*:e")]
            client.set(key, hostile(kind), px=60_000)
        finally:
            client.close()
        tracemalloc.start()
        try:
            status, headers, body = await get(http, f"{url}/products/42")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (status, headers["X-Cache"]) == (200, "MISS")
        assert orjson.loads(body)["product"]["id"] == 42
        print(f"\nhostile {kind} entry: peak traced allocation {peak / 1e6:.1f} MB")
        assert peak < 40e6, peak  # the 8 MiB read/inflate bound, copies included; not 100-300 MB
        status, headers, again = await get(http, f"{url}/products/42")
        assert (status, headers["X-Cache"], again) == (200, "HIT", body)  # overwritten
