"""The composite cache seen from outside: the real app (in-process, and as two `gateway serve`
processes) on MariaDB, Redis and the simulated services, whose request counters are the proof."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.config.loader import LoadedConfig
from gateway.demo.simulator import SERVICES, Simulators
from tests.config_files import GENEROUS, config_text, gateway_process, server_env
from tests.redis_servers import stop
from tests.serving import product_view_config, product_view_env, serving_config
from tests.support import free_port, get, until

PRODUCTS = 500
TOKEN = "admin-token-for-cache-tests"
ONCE = dict.fromkeys(SERVICES, 1)

SWR_ONLY = {"stale_if_error_s: 3600": "stale_if_error_s: 0"}
SIE_ONLY = {"stale_while_revalidate_s: 300": "stale_while_revalidate_s: 0"}
PRICE_REQUIRED = {"fallback: {currency: USD, amount: null}": "required: true"}
BYPASSABLE = {'tags: ["product:{id}"]}': 'tags: ["product:{id}"], allow_client_bypass: true}'}
NEAR = "near: {max_entries: 100, ttl_s: 5}"
BUSY_HOST_OP_TIMEOUT = "op_timeout_ms: 250"
"""Gateway, services and client share this host's few CPUs (and one loop in-process): a 20 ms
Redis op timeout would test the host's scheduling, not the cache's behaviour."""


@pytest.fixture
def env(sims: Simulators, catalog_dsn: str, redis_url: str) -> dict[str, str]:
    return product_view_env(sims, catalog_dsn, redis_url)


def loaded(
    env: Mapping[str, str],
    prefix: str,
    *edits: Mapping[str, str],
    cache: tuple[str, ...] = (BUSY_HOST_OP_TIMEOUT,),
) -> LoadedConfig:
    """Return the shipped gateway.yaml with generous timeouts (this file tests the cache, not
    timing on a busy machine), `cache` lines added to its `cache:` and `edits` applied."""
    edit: dict[str, str] = dict(GENEROUS)
    if cache:
        edit["# memory:// for the embedded default"] = "".join(f"\n  {line}" for line in cache)
    for more in edits:
        edit.update(more)
    return product_view_config(env, prefix, edit)


def ttl(ttl_s: int = 60, partial_ttl_s: int = 5) -> dict[str, str]:
    """Return the edit that sets the product view's TTLs."""
    return {"ttl_s: 60, partial_ttl_s: 5": f"ttl_s: {ttl_s}, partial_ttl_s: {partial_ttl_s}"}


def delay(sims: Simulators, ms: float) -> None:
    for name in SERVICES:
        sims.behaviour(name).update({"delay_ms": ms})


# --- single-flight ----------------------------------------------------------------------------


async def test_200_concurrent_requests_on_a_cold_key_call_each_upstream_once(
    env: dict[str, str], redis_prefix: str, sims: Simulators, http: aiohttp.ClientSession
) -> None:
    # Gateway, services and client share one loop here: the delay makes the 200 overlap.
    delay(sims, 30)
    async with serving_config(loaded(env, redis_prefix)) as url:
        started = time.monotonic()
        answers = await asyncio.gather(*(get(http, f"{url}/products/42") for _ in range(200)))
        elapsed = time.monotonic() - started
    assert sims.counts() == ONCE
    assert [status for status, _, _ in answers] == [200] * 200
    assert len({body for _, _, body in answers}) == 1
    assert {h["X-Cache"] for _, h, _ in answers} <= {"MISS", "HIT"}
    assert elapsed < 20, elapsed
    print(
        f"\nstampede, one process: 200 answers in {elapsed:.2f} s, upstream calls {sims.counts()}"
    )


async def test_200_concurrent_requests_across_two_gateway_processes_call_each_upstream_once(
    sims: Simulators,
    catalog_dsn: str,
    redis_url: str,
    redis_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    timeout = {"# memory:// for the embedded default": f"\n  {BUSY_HOST_OP_TIMEOUT}"}
    path.write_text(config_text(redis_prefix, timeout))
    variables = server_env(sims, catalog_dsn, redis_url, admin_token=None)
    ports = [free_port(), free_port()]
    async with AsyncExitStack() as stack:
        await asyncio.gather(
            *(
                stack.enter_async_context(
                    gateway_process(path, port, variables, tmp_path / f"gw{i}.log")
                )
                for i, port in enumerate(ports)
            )
        )
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        # Both processes warm (pools, Redis connections) on another key, so the cold key's
        # requests meet the lock, not process start-up.
        await asyncio.gather(*(get(http, f"{u}/products/1") for u in urls))
        sims.reset()
        delay(sims, 30)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(get(http, f"{urls[i % 2]}/products/77") for i in range(200))
        )
        elapsed = time.monotonic() - started
    assert sims.counts() == ONCE
    assert [status for status, _, _ in answers] == [200] * 200
    assert len({body for _, _, body in answers}) == 1
    assert elapsed < 20, elapsed
    print(
        f"\nstampede, two processes: 200 answers in {elapsed:.2f} s, upstream calls {sims.counts()}"
    )


# --- stale answers ----------------------------------------------------------------------------


async def test_expired_answer_is_served_stale_while_exactly_one_refresh_runs(
    env: dict[str, str], redis_prefix: str, sims: Simulators, http: aiohttp.ClientSession
) -> None:
    async with serving_config(loaded(env, redis_prefix, ttl(60, 1), SWR_ONLY)) as url:
        # The first answer is partial (recs fails), kept 1 s: its refresh is complete, so the
        # new answer is told apart from the old one by its body.
        sims.behaviour("recs").update({"error_rate": 1.0})
        status, h1, old = await get(http, f"{url}/products/42")
        assert (status, h1["X-Cache"], h1["X-Gateway-Complete"]) == (200, "MISS", "false")
        sims.behaviour("recs").update({"error_rate": 0.0})
        delay(sims, 200)  # the refresh takes a while, and every request meanwhile is STALE
        await asyncio.sleep(1.1)
        sims.reset()
        started = time.monotonic()
        status, h2, body = await get(http, f"{url}/products/42")
        answered_in = time.monotonic() - started
        assert (status, h2["X-Cache"], body) == (200, "STALE", old)
        assert answered_in < 0.15, answered_in  # not waiting for the 200 ms refresh
        assert h2["Cache-Control"] == "no-store"  # a partial answer, stale or not
        during = await asyncio.gather(*(get(http, f"{url}/products/42") for _ in range(20)))
        assert {(s, h["X-Cache"], b) for s, h, b in during} == {(200, "STALE", old)}
        await until(lambda: sims.counts() == ONCE)
        await asyncio.sleep(0.3)  # time for a second refresh, if there were one
        assert sims.counts() == ONCE
        status, h3, new = await get(http, f"{url}/products/42")
        assert (status, h3["X-Cache"], h3["X-Gateway-Complete"]) == (200, "HIT", "true")
        assert new != old and orjson.loads(new)["_meta"] == {"complete": True, "sources": {}}
        assert h3["Cache-Control"].startswith("public, max-age=")
        assert sims.counts() == ONCE


async def test_required_call_failing_after_expiry_serves_the_stale_copy(
    env: dict[str, str], redis_prefix: str, sims: Simulators, http: aiohttp.ClientSession
) -> None:
    # `price` made required: pricing failing is a failed required call (502 without the cache).
    config = loaded(env, redis_prefix, ttl(1, 1), SIE_ONLY, PRICE_REQUIRED)
    async with serving_config(config) as url:
        status, h1, fresh = await get(http, f"{url}/products/42")
        assert (status, h1["X-Cache"]) == (200, "MISS")
        sims.behaviour("pricing").update({"error_rate": 1.0})
        status, _, body = await get(http, f"{url}/products/43")
        assert status == 502 and b'"call":"price"' in body  # nothing stored to fall back on
        await asyncio.sleep(1.1)
        status, headers, body = await get(http, f"{url}/products/42")
    assert (status, headers["X-Cache"], headers["Cache-Control"]) == (200, "STALE", "no-store")
    assert "ETag" not in headers  # the body is not the stored one
    doc = orjson.loads(body)
    assert 1.0 <= doc["_meta"]["stale_age_s"] < 5
    doc["_meta"].pop("stale_age_s")
    assert doc == orjson.loads(fresh)


# --- clients and operators --------------------------------------------------------------------


@pytest.mark.parametrize("allowed", [True, False], ids=["bypass-allowed", "bypass-refused"])
async def test_client_no_cache_bypasses_only_where_the_endpoint_allows_it(
    env: dict[str, str],
    redis_prefix: str,
    sims: Simulators,
    http: aiohttp.ClientSession,
    allowed: bool,
) -> None:
    edits = [BYPASSABLE] if allowed else []
    async with serving_config(loaded(env, redis_prefix, *edits)) as url:
        await get(http, f"{url}/products/42")
        no_cache = {"Cache-Control": "max-age=0, No-Cache"}  # directives are case-insensitive
        status, headers, _ = await get(http, f"{url}/products/42", **no_cache)
        assert status == 200
        if allowed:
            assert headers["X-Cache"] == "BYPASS" and sims.counts() == dict.fromkeys(SERVICES, 2)
        else:
            assert headers["X-Cache"] == "HIT" and sims.counts() == ONCE
        _, after, _ = await get(http, f"{url}/products/42")
        assert after["X-Cache"] == "HIT"


async def test_purge_by_tag_on_one_instance_makes_the_next_request_on_another_a_miss(
    env: dict[str, str],
    redis_prefix: str,
    sims: Simulators,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two apps on one Redis, each with a near tier that would otherwise answer for 5 s.
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    config = loaded(env, redis_prefix, cache=(BUSY_HOST_OP_TIMEOUT, NEAR))
    assert config.config.cache.near is not None
    async with serving_config(config) as one, serving_config(config) as two:
        _, h, _ = await get(http, f"{one}/products/42")
        assert h["X-Cache"] == "MISS"
        await get(http, f"{one}/products/43")
        # The second instance's near tier subscribes at its first request, then holds.
        _, h, _ = await get(http, f"{two}/products/43")
        await asyncio.sleep(0.2)
        for _ in range(3):
            _, h, _ = await get(http, f"{two}/products/42")
            assert h["X-Cache"] == "HIT"
        async with http.post(
            f"{one}/admin/cache/purge",
            json={"tags": ["product:42"]},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp:
            assert resp.status == 200 and await resp.json() == {"removed": 1}
        states = []
        for _ in range(100):  # 2 s at most, far less than the 5 s the near tier holds
            _, h, _ = await get(http, f"{two}/products/42")
            states.append(h["X-Cache"])
            if states[-1] == "MISS":
                break
            await asyncio.sleep(0.02)
        assert states[-1] == "MISS", states
        _, h, _ = await get(http, f"{two}/products/43")
        assert h["X-Cache"] == "HIT"  # another tag's entry stays
        _, h, _ = await get(http, f"{one}/products/42")
        assert h["X-Cache"] == "HIT"  # the one recomputed answer, stored for both
    assert sims.counts() == dict.fromkeys(SERVICES, 3)


# --- Redis down -------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p = statistics.quantiles(ms, n=100, method="inclusive")
    return f"n={len(ms)} p50={p[49]:.1f} ms p99={p[98]:.1f} ms max={ms[-1]:.1f} ms"


async def test_redis_killed_and_restarted_under_load_every_request_answers(
    env: dict[str, str],
    redis_prefix: str,
    http: aiohttp.ClientSession,
    throwaway: Callable[[int], subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    server = throwaway(port)
    # The shipped 20 ms op timeout: this is the test of what it is for.
    config = loaded({**env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, redis_prefix, cache=())
    times: dict[str, list[float]] = {"up": [], "down": [], "back": []}
    states: dict[str, Counter[str]] = {phase: Counter() for phase in times}
    phase = "up"
    stopping = asyncio.Event()

    async def client(n: int) -> None:
        for i in range(100_000):  # bounded; ends when the test says so
            if stopping.is_set():
                return
            now = phase
            started = time.monotonic()
            status, headers, body = await get(http, f"{url}/products/{1 + (n * 7 + i) % 20}")
            times[now].append(time.monotonic() - started)
            assert status == 200, body
            # A request the kill or the restart happened under is timed but its cache outcome
            # is no phase's: started while Redis was down, it may read what another wrote after
            # the restart (CI saw a HIT that way).
            if phase == now:
                states[now][headers["X-Cache"]] += 1

    async with serving_config(config) as url:
        load = [asyncio.create_task(client(n)) for n in range(8)]
        try:
            await asyncio.sleep(1.0)
            stop(server)
            phase = "down"
            await asyncio.sleep(2.0)
            throwaway(port)
            phase = "back"
            await until(lambda: states["back"]["HIT"] >= 20, within_s=10)
        finally:
            stopping.set()
            await asyncio.gather(*load)
    for name, samples in times.items():
        print(f"\nredis {name}: {percentiles(samples)} X-Cache {dict(states[name])}", end="")
    print()
    assert states["up"]["HIT"] > 0
    assert set(states["down"]) == {"MISS"} and len(times["down"]) >= 50
    assert max(times["down"]) < 1.0, percentiles(times["down"])
