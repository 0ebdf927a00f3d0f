"""The demo's breaker, end to end: pricing failing 100 % stops being called, then heals.

The real app serves the shipped gateway.yaml (SQLite catalog, in-memory cache, the simulated
services), with pricing's `open_ms` cut from 5000 to 1000 so the test stays short, and the
deadline and timeouts made generous so a busy machine cannot turn a slow catalog into a 504.
Each request asks for a different product so the cache never answers in the upstream's place.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from gateway.demo.catalog import seed_sqlite
from gateway.demo.simulator import Simulators
from tests.config_files import GENEROUS
from tests.serving import product_view_config, product_view_env, serving_config

OPEN_S = 1.0
MIN_CALLS = 20  # pricing's breaker in gateway.yaml: failure_ratio 0.5, min_calls 20


async def test_breaker_stops_calls_to_a_failing_upstream_and_closes_once_it_heals(
    sims: Simulators, tmp_path: Path
) -> None:
    db = tmp_path / "catalog.db"
    await asyncio.to_thread(seed_sqlite, str(db), 200)
    env = product_view_env(sims, f"sqlite:///{db}", "memory://")
    # Generous deadline and timeouts: only pricing's answers (503 or not) are under test here.
    edit = {**GENEROUS, "open_ms: 5000": f"open_ms: {int(OPEN_S * 1000)}"}
    loaded = product_view_config(env, edit=edit)
    pricing = sims.services["pricing"]
    product_ids = iter(range(1, 201))

    async def price_outcomes(http: aiohttp.ClientSession, url: str, n: int) -> list[str]:
        """Send `n` requests for new products; return the price call's outcome in each."""
        found = []
        for _ in range(n):
            async with http.get(f"{url}/products/{next(product_ids)}") as resp:
                assert resp.status == 200
                doc = await resp.json()
            found.append(doc["_meta"]["sources"].get("price", "ok"))
        return found

    async with serving_config(loaded) as url, aiohttp.ClientSession() as http:
        sims.behaviour("pricing").update({"error_rate": 1.0})
        failing = await price_outcomes(http, url, MIN_CALLS)
        assert failing == ["error"] * MIN_CALLS
        opened_at = asyncio.get_running_loop().time()
        at_open = pricing.requests
        # One request per call, plus the few retries the budget allows (3, or 20 % of calls).
        assert MIN_CALLS < at_open <= MIN_CALLS + 4

        counts = [at_open]
        assert await price_outcomes(http, url, 10) == ["circuit_open"] * 10
        counts.append(pricing.requests)
        assert pricing.requests == at_open  # the count stopped growing: the breaker is open

        sims.behaviour("pricing").update({"error_rate": 0.0})
        assert await price_outcomes(http, url, 3) == ["circuit_open"] * 3
        assert pricing.requests == at_open  # healed, but open_ms has not passed yet
        await asyncio.sleep(max(0.0, opened_at + OPEN_S + 0.1 - asyncio.get_running_loop().time()))

        assert await price_outcomes(http, url, 10) == ["ok"] * 10
        # The first was the half-open probe; it closed the breaker and every call went through.
        assert pricing.requests == at_open + 10
        print(
            f"pricing requests: {counts[0]} when open, {counts[1]} after 10 more, "
            f"{pricing.requests} after healing and 10 more"
        )
