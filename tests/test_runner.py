"""An endpoint's runner, called directly: parameters and a request context in, a reply out."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from cache.composite import CompositeCache
from cache.memory import MemoryStore
from gateway.config import loader as config
from gateway.core.context import RequestContext
from gateway.core.errors import SourceUnavailable
from gateway.core.executor import Composite
from gateway.core.plan import EndpointPlan, build_plans
from gateway.core.runner import Runner
from gateway.core.types import Source
from tests.support import failing, ok
from upstreams.policies import timeout

CONFIG = """\
version: 1
sources:
  catalog: {kind: sql, dsn: "sqlite:///x.db", timeout_ms: 100}
  pricing: {kind: http, base_url: "http://127.0.0.1:1", timeout_ms: 100}
endpoints:
  - path: /products/{id:int}
    deadline_ms: 200
    cache: {ttl_s: 60, partial_ttl_s: 5}
    calls:
      product: {source: catalog, query: "SELECT 1 WHERE %(id)s", one: true, required: true}
      price: {source: pricing, path: "/prices/{id}", fallback: {currency: USD, amount: null}}
"""
PRODUCT = {"id": 42, "name": "Lamp"}


def plan() -> EndpointPlan:
    return build_plans(config.loads(CONFIG, "t.yaml", {}).config)[0]


def runner(
    pricing: Source, observed: list[Composite], cached: bool = True
) -> tuple[Runner, CompositeCache]:
    p = plan()
    cache = CompositeCache(MemoryStore(100, 1 << 20))
    sources = {"catalog": timeout(ok(PRODUCT)), "pricing": timeout(pricing)}
    policy = p.cache if cached else None
    return Runner(p, sources, cache, policy, "t:", lambda _, c: observed.append(c)), cache


def request(headers: dict[bytes, bytes] | None = None) -> RequestContext:
    return RequestContext("rid-1", asyncio.get_running_loop().time(), headers or {})


async def test_a_miss_fills_the_request_context_and_a_second_request_hits() -> None:
    observed: list[Composite] = []
    run, _ = runner(ok({"currency": "EUR", "amount": 9.5}), observed)
    ctx = request()
    status, headers, body = await run(ctx, {"id": 42})
    assert status == 200
    assert orjson.loads(body)["price"] == {"currency": "EUR", "amount": 9.5}
    got = dict(headers)
    assert got[b"x-cache"] == b"MISS" and got[b"x-gateway-complete"] == b"true"
    assert got[b"cache-control"] in (b"public, max-age=59", b"public, max-age=60")  # floored
    assert got[b"server-timing"].startswith(b"product;dur=")
    assert (ctx.endpoint, ctx.cache, ctx.complete) == ("GET /products/{id:int}", "MISS", True)
    assert set(ctx.calls) == {"product", "price"} and ctx.fanout is not None
    assert ctx.deadline == ctx.arrived + 0.2
    assert len(observed) == 1  # metrics and statistics see the fan-out once

    again = request({b"if-none-match": got[b"etag"]})
    status, headers, body = await run(again, {"id": 42})
    assert (status, body, dict(headers)[b"x-cache"]) == (304, b"", b"HIT")
    assert (again.cache, again.calls, again.fanout) == ("HIT", {}, None)
    assert len(observed) == 1


async def test_a_partial_answer_is_not_for_shared_caches_and_says_why() -> None:
    run, _ = runner(failing(SourceUnavailable("down")), [])
    ctx = request()
    status, headers, body = await run(ctx, {"id": 42})
    got = dict(headers)
    assert status == 200 and got[b"cache-control"] == b"no-store"
    assert b'price;desc="error";dur=' in got[b"server-timing"]
    assert orjson.loads(body)["_meta"] == {"complete": False, "sources": {"price": "error"}}
    assert ctx.complete is False and ctx.calls["price"]["outcome"] == "error"


async def test_an_endpoint_without_a_cache_policy_never_asks_the_cache() -> None:
    run, cache = runner(ok({}), [], cached=False)
    events: list[Any] = []
    cache.on_event = events.append
    for _ in range(2):
        ctx = request()
        status, headers, _ = await run(ctx, {"id": 42})
        assert status == 200 and dict(headers)[b"x-cache"] == b"BYPASS"
    assert events == [] and ctx.cache == "BYPASS"
