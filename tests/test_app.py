"""The whole gateway against real MariaDB, real Redis and real loopback HTTP services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.demo.simulator import Simulators
from gateway.edge.routing import Edge
from tests.serving import product_view_config, product_view_env, serving_config
from tests.support import free_port, get

PRODUCTS = 500


@pytest.fixture
async def gateway(product_env: dict[str, str], redis_prefix: str) -> AsyncIterator[str]:
    async with serving_config(product_view_config(product_env, redis_prefix)) as url:
        yield url


def test_endpoints_are_served_in_plain_asgi_around_an_unpatched_fastapi(
    product_env: dict[str, str], redis_prefix: str
) -> None:
    app = create_app(loaded=product_view_config(product_env, redis_prefix))
    assert isinstance(app, Edge) and isinstance(app.framework, FastAPI)
    assert "build_middleware_stack" not in vars(app.framework)  # FastAPI's own stack, as built
    assert app.state.gateway is app.framework.state.gateway


async def test_complete_product_view(gateway: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway}/products/42", headers={"X-Request-ID": "req-42"}) as resp:
        assert resp.status == 200
        doc = await resp.json()
        headers = resp.headers
    assert doc["product"] == {
        "id": 42,
        "sku": "SKU-42",
        "name": doc["product"]["name"],
        "brand": doc["product"]["brand"],
        "category": doc["product"]["category"],
    }
    assert set(doc["price"]) == {"currency", "amount", "discount"}
    assert doc["stock"] == {"available": doc["stock"]["available"]}  # select: [available]
    assert doc["recommendations"]["category"] == doc["product"]["category"]
    assert doc["_meta"] == {"complete": True, "sources": {}}
    assert list(doc) == ["product", "price", "stock", "reviews", "recommendations", "_meta"]
    assert headers["X-Gateway-Complete"] == "true"
    assert headers["X-Cache"] == "MISS"
    assert headers["X-Request-ID"] == "req-42"
    assert headers["Cache-Control"].startswith("public, max-age=")
    timing = headers["Server-Timing"].split(", ")
    assert [t.split(";")[0] for t in timing] == [
        "product",
        "price",
        "stock",
        "reviews",
        "recommendations",
    ]
    assert all(";dur=" in t for t in timing)


async def test_second_request_is_a_hit_with_the_same_bytes_and_304(
    gateway: str, http: aiohttp.ClientSession, sims: Simulators
) -> None:
    status, h1, body1 = await get(http, f"{gateway}/products/7")
    calls = sims.counts()
    status2, h2, body2 = await get(http, f"{gateway}/products/7")
    assert (status, status2) == (200, 200)
    assert h2["X-Cache"] == "HIT" and body2 == body1 and h2["ETag"] == h1["ETag"]
    assert sims.counts() == calls  # no upstream was called for the hit
    status3, _h3, body3 = await get(http, f"{gateway}/products/7", **{"If-None-Match": h1["ETag"]})
    assert status3 == 304 and body3 == b""


async def test_hung_optional_upstream_costs_only_its_part_within_the_deadline(
    gateway: str, http: aiohttp.ClientSession, sims: Simulators
) -> None:
    sims.behaviour("inventory").update({"hang_rate": 1.0})
    t0 = time.monotonic()
    status, headers, body = await get(http, f"{gateway}/products/43")
    elapsed = time.monotonic() - t0
    assert status == 200
    assert elapsed < 0.300 + 0.200  # deadline_ms 300; generous bound on a shared machine
    doc = orjson.loads(body)
    assert doc["stock"] is None
    assert doc["_meta"] == {"complete": False, "sources": {"stock": "timeout"}}
    assert headers["X-Gateway-Complete"] == "false"
    assert headers["Cache-Control"] == "no-store"
    assert 'stock;desc="timeout"' in headers["Server-Timing"]


async def test_each_fallback_kind(
    gateway: str, http: aiohttp.ClientSession, sims: Simulators
) -> None:
    for name in ("pricing", "inventory", "reviews", "recs"):
        sims.behaviour(name).update({"error_rate": 1.0})
    status, _headers, body = await get(http, f"{gateway}/products/44")
    doc = orjson.loads(body)
    assert status == 200
    assert doc["price"] == {"currency": "USD", "amount": None}  # a value
    assert doc["stock"] is None  # null
    assert "reviews" not in doc  # omit
    assert doc["recommendations"] == {"product_ids": []}
    assert doc["_meta"]["sources"] == {
        "price": "error",
        "stock": "error",
        "reviews": "error",
        "recommendations": "error",
    }


async def test_missing_product_is_404_and_cached_briefly(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await get(http, f"{gateway}/products/{PRODUCTS + 1000}")
    assert status == 404
    assert b'"outcome":"not_found"' in body and headers["Content-Type"] == "application/json"
    status2, headers2, _ = await get(http, f"{gateway}/products/{PRODUCTS + 1000}")
    assert status2 == 404 and headers2["X-Cache"] == "HIT"


@pytest.mark.parametrize("bad", ["abc", "4.2", "1e3", "%20"])
async def test_bad_path_parameter_is_422_with_fastapi_body(
    gateway: str, http: aiohttp.ClientSession, bad: str
) -> None:
    async with http.get(f"{gateway}/products/{bad}") as resp:
        assert resp.status == 422
        body = await resp.json()
    assert body["detail"][0]["loc"] == ["path", "id"]
    assert body["detail"][0]["type"] == "int_parsing"


async def test_openapi_describes_the_configured_endpoint(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway}/openapi.json") as resp:
        spec = await resp.json()
    op = spec["paths"]["/products/{id}"]["get"]
    assert [p for p in op["parameters"] if p["in"] == "path"] == [
        {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        }
    ]
    assert {"200", "404", "422", "502", "503", "504"} <= set(op["responses"])
    async with http.get(f"{gateway}/docs") as resp:
        assert resp.status == 200


async def test_database_down_is_502_json_not_a_traceback(
    sims: Simulators, redis_url: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    dead = f"mysql://root@127.0.0.1:{free_port()}/catalog"
    env = product_view_env(sims, dead, redis_url)
    async with serving_config(product_view_config(env, redis_prefix)) as url:
        status, headers, body = await get(http, f"{url}/products/42")
        assert status in (502, 504), body
        assert headers["Content-Type"] == "application/json"
        assert b'"call":"product"' in body and b"Traceback" not in body
        ready, _, reasons = await get(http, f"{url}/readyz")
        # Ready all the same: the database is every instance's, not this one's to fail on.
        assert ready == 200 and b'"catalog"' in reasons


async def test_required_timeout_is_504(
    product_env: dict[str, str], redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    slow_query = (
        '"SELECT id, sku, name, brand, category FROM products WHERE id = %(id)s"',
        '"SELECT id, sku, name, brand, category FROM products WHERE id = %(id)s AND SLEEP(1) = 0"',
    )
    loaded = product_view_config(product_env, redis_prefix, edit=dict([slow_query]))
    async with serving_config(loaded) as url:
        t0 = time.monotonic()
        status, _, body = await get(http, f"{url}/products/42")
        assert status == 504, body
        assert time.monotonic() - t0 < 0.8
        assert b'"outcome":"timeout"' in body


async def test_redis_down_means_uncached_answers_not_errors(
    sims: Simulators, catalog_dsn: str, http: aiohttp.ClientSession
) -> None:
    env = product_view_env(sims, catalog_dsn, f"redis://127.0.0.1:{free_port()}/0")
    async with serving_config(product_view_config(env)) as url:
        for _ in range(3):
            status, headers, _ = await get(http, f"{url}/products/42")
            assert status == 200 and headers["X-Cache"] == "MISS"


async def test_memory_cache_behaves_like_redis(
    sims: Simulators, catalog_dsn: str, http: aiohttp.ClientSession
) -> None:
    env = product_view_env(sims, catalog_dsn, "memory://")
    async with serving_config(product_view_config(env)) as url:
        _, h1, b1 = await get(http, f"{url}/products/9")
        _, h2, b2 = await get(http, f"{url}/products/9")
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT") and b1 == b2


async def test_concurrent_requests_each_get_their_own_product(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    # Gateway, services and client share one process and one loop here, so bursts are kept to
    # 20 at a time: the point is that answers never mix, not how much one loop can take.
    async def one(i: int) -> int:
        async with http.get(f"{gateway}/products/{i}") as resp:
            doc = await resp.json()
            assert resp.status == 200, doc
            return int(doc["product"]["id"])

    await asyncio.gather(*(get(http, f"{gateway}/products/{i}") for i in range(1, 21)))
    for start in (100, 120, 140):
        ids = list(range(start, start + 20))
        assert await asyncio.gather(*(one(i) for i in ids)) == ids
