"""The simulated upstreams and the seeded catalog: deterministic data, faults on demand."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import aiomysql
import pytest

from gateway.demo import catalog
from gateway.demo.simulator import Simulators, start_simulators

# `sims` and `http` are tests/conftest.py's fixtures.


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def test_bodies_have_the_documented_shapes(sims: Simulators, http: aiohttp.ClientSession):
    status, price = await _get(http, f"{sims.urls['pricing']}/prices/42")
    assert status == 200
    assert isinstance(price, dict) and price["currency"] == "USD"
    assert round(price["amount"], 2) == price["amount"] and price["amount"] > 0
    assert 0 <= price["discount"] <= 0.3

    status, stock = await _get(http, f"{sims.urls['inventory']}/stock/42")
    assert status == 200 and isinstance(stock, dict)
    assert isinstance(stock["available"], int) and isinstance(stock["warehouse"], str)

    status, reviews = await _get(http, f"{sims.urls['reviews']}/products/42/reviews")
    assert status == 200 and isinstance(reviews, dict)
    assert 1 <= reviews["average"] <= 5 and isinstance(reviews["count"], int)
    assert [set(r) for r in reviews["top"]] == [{"rating", "text"}] * 2

    status, recs = await _get(http, f"{sims.urls['recs']}/recommendations/42?category=home")
    assert status == 200
    assert recs == {"product_ids": recs["product_ids"], "category": "home"}  # type: ignore[index]
    assert len(recs["product_ids"]) == 5  # type: ignore[index]


async def test_bodies_depend_only_on_the_id(http: aiohttp.ClientSession):
    first, second = await start_simulators(), await start_simulators()
    try:
        paths = {
            "pricing": "/prices/{}",
            "inventory": "/stock/{}",
            "reviews": "/products/{}/reviews",
            "recs": "/recommendations/{}?category=toys",
        }
        for name, path in paths.items():
            a = await _get(http, first.urls[name] + path.format(7))
            b = await _get(http, second.urls[name] + path.format(7))
            other = await _get(http, first.urls[name] + path.format(8))
            assert a == b
            assert a != other
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("product_id", ["abc", "0", "-3", "99999999", "1.5"])
async def test_unknown_or_non_numeric_ids_are_404_json(
    sims: Simulators, http: aiohttp.ClientSession, product_id: str
):
    status, body = await _get(http, f"{sims.urls['pricing']}/prices/{product_id}")
    assert (status, body) == (404, {"error": "not_found"})


async def test_requests_are_counted_per_service(sims: Simulators, http: aiohttp.ClientSession):
    for _ in range(3):
        await _get(http, f"{sims.urls['inventory']}/stock/1")
    await _get(http, f"{sims.urls['recs']}/recommendations/1")
    assert sims.counts() == {"pricing": 0, "inventory": 3, "reviews": 0, "recs": 1}
    status, stats = await _get(http, f"{sims.urls['inventory']}/_stats")
    assert status == 200 and stats["requests"] == 3  # type: ignore[index]
    async with http.post(f"{sims.urls['inventory']}/_stats/reset") as resp:
        assert resp.status == 200
    assert sims.counts()["inventory"] == 0


async def test_delay_set_in_process_slows_answers(sims: Simulators, http: aiohttp.ClientSession):
    sims.behaviour("pricing").delay_ms = 100
    started = time.monotonic()
    status, _ = await _get(http, f"{sims.urls['pricing']}/prices/1")
    assert status == 200
    assert 0.09 <= time.monotonic() - started < 2


async def test_error_rate_one_over_http_answers_503(sims: Simulators, http: aiohttp.ClientSession):
    async with http.post(f"{sims.urls['reviews']}/_control", json={"error_rate": 1}) as resp:
        assert resp.status == 200
        assert (await resp.json())["error_rate"] == 1
    for _ in range(3):
        status, _ = await _get(http, f"{sims.urls['reviews']}/products/1/reviews")
        assert status == 503
    _, stats = await _get(http, f"{sims.urls['reviews']}/_stats")
    assert stats["errors"] == 3  # type: ignore[index]


async def test_bad_control_bodies_are_rejected(sims: Simulators, http: aiohttp.ClientSession):
    too_long = {"delay_ms": 30_000, "jitter_ms": 1}  # past MAX_WAIT_S: every wait is bounded
    for body in ({"error_rate": 2}, {"delay": 5}, {"hang_rate": "x"}, [1], too_long):
        async with http.post(f"{sims.urls['recs']}/_control", json=body) as resp:
            assert resp.status == 400
    assert sims.behaviour("recs").error_rate == 0


async def test_error_draws_are_reproducible(http: aiohttp.ClientSession):
    async def statuses() -> list[int]:
        s = await start_simulators()
        try:
            s.behaviour("pricing").error_rate = 0.5
            return [(await _get(http, f"{s.urls['pricing']}/prices/1"))[0] for _ in range(20)]
        finally:
            await s.close()

    first = await statuses()
    assert first == await statuses()
    assert {200, 503} == set(first)


async def test_a_hang_outlasts_the_client_timeout_and_ends_on_close(
    http: aiohttp.ClientSession,
):
    sims = await start_simulators()
    sims.behaviour("inventory").hang_rate = 1
    with pytest.raises(TimeoutError):
        async with http.get(
            f"{sims.urls['inventory']}/stock/1", timeout=aiohttp.ClientTimeout(total=0.2)
        ):
            pass
    pending = asyncio.ensure_future(_get(http, f"{sims.urls['inventory']}/stock/1"))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await sims.close()
    assert time.monotonic() - started < 5
    try:
        status, _ = await pending
    except aiohttp.ClientError:
        pass  # a dropped connection ends the hang as well as an answer does
    else:
        assert status == 503


def test_seed_sqlite_writes_count_deterministic_rows(tmp_path: Path):
    path = str(tmp_path / "catalog.db")
    catalog.seed_sqlite(path, count=500)
    catalog.seed_sqlite(path, count=500)  # idempotent
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM products").fetchone() == (500,)
        got = conn.execute(
            "SELECT id, sku, name, brand, category, price FROM products WHERE id = 42"
        ).fetchone()
    finally:
        conn.close()
    expected = catalog.row(42)
    assert got[:5] == expected[:5]
    assert got[1] == "SKU-42" and got[4] in catalog.CATEGORIES
    assert Decimal(str(got[5])) == expected[5]


async def test_seed_mysql_writes_count_deterministic_rows(mysql_url: str):
    await catalog.seed_mysql(mysql_url, count=2500)
    await catalog.seed_mysql(mysql_url, count=2500)  # idempotent
    parts = urlsplit(mysql_url)
    conn = await aiomysql.connect(
        host=parts.hostname, port=parts.port, user="root", db=parts.path.lstrip("/")
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM products")
            assert await cur.fetchone() == (2500, 1, 2500)
            await cur.execute("SELECT * FROM products WHERE id = %s", (1234,))
            got = await cur.fetchone()
    finally:
        conn.close()
    assert got == catalog.row(1234)
    assert isinstance(got[6], datetime)


async def test_seed_mysql_creates_a_missing_database(mysql_url: str):
    parts = urlsplit(mysql_url)
    name = parts.path.lstrip("/") + "_new"
    try:
        await catalog.seed_mysql(f"mysql://root@{parts.hostname}:{parts.port}/{name}", count=10)
        conn = await aiomysql.connect(host=parts.hostname, port=parts.port, user="root", db=name)
        async with conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM products")
            assert await cur.fetchone() == (10,)
        conn.close()
    finally:
        conn = await aiomysql.connect(host=parts.hostname, port=parts.port, user="root")
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()
