"""The process readouts for leak hunts: tasks, RSS and cache pool in /admin/sources, and
tracemalloc's top sites at /admin/debug/memory. The real app on MariaDB, Redis and the
simulators."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from cache.redis import redis_store
from gateway.app import create_app
from gateway.ops.diagnostics import TRACEMALLOC_ENV, memory_report, process_report
from tests.config_files import config_text, write_config
from tests.serving import serving

TOKEN = "diagnostics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def config_file(
    tmp_path: Path, redis_prefix: str, served_env: Callable[..., dict[str, str]]
) -> Path:
    served_env(TOKEN)
    return write_config(tmp_path, config_text(redis_prefix))


@pytest.fixture
def no_tracing() -> Iterator[None]:
    """tracemalloc runs in this very process: whatever a test starts is stopped afterwards."""
    was = tracemalloc.is_tracing()
    yield
    if tracemalloc.is_tracing() and not was:
        tracemalloc.stop()


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_sources_report_has_the_process_tasks_rss_and_cache_pool(config_file: Path) -> None:
    async with serving(create_app(str(config_file))) as url, aiohttp.ClientSession() as http:
        idle = (await get_json(http, f"{url}/admin/sources"))[1]["process"]
        assert idle["pid"] == os.getpid()
        assert idle["tasks"] >= 1 and idle["rss_kb"] > 1000
        assert set(idle["loop_lag_ms"]) == {"worst", "stall_ms", "stalls"}
        # 40 concurrent misses: tasks and Redis connections come and go with them.
        statuses = []
        for resp in await asyncio.gather(*(http.get(f"{url}/products/{i}") for i in range(1, 41))):
            statuses.append(resp.status)
            resp.release()
        assert statuses == [200] * 40
        status, body = await get_json(http, f"{url}/admin/sources")
        after = body["process"]
        assert status == 200
        assert after["cache_pool"]["in_use"] == 0 and after["cache_pool"]["idle"] >= 1
        assert after["cache_pool"]["abandoned"] == 0
        assert all(s["pool"]["in_use"] == 0 for s in body["sources"].values())
        # The simulators share this loop (a task per keep-alive connection), so whether tasks
        # return to their baseline is for the chaos run's separate processes to show.
        assert isinstance(after["tasks"], int) and after["tasks"] >= 1
        # The loop's lag is measured all along, for the histogram too.
        async with http.get(f"{url}/metrics") as resp:
            exposition = await resp.text()
        assert "gateway_event_loop_lag_seconds_count" in exposition
        count = next(
            float(line.split()[-1])
            for line in exposition.splitlines()
            if line.startswith("gateway_event_loop_lag_seconds_count")
        )
        assert count >= 1


async def test_debug_memory_is_409_unless_tracemalloc_was_asked_for(
    config_file: Path, no_tracing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRACEMALLOC_ENV, raising=False)
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc was started outside this test (python -X tracemalloc)")
    async with serving(create_app(str(config_file))) as url, aiohttp.ClientSession() as http:
        status, body = await get_json(http, f"{url}/admin/debug/memory")
        assert status == 409 and TRACEMALLOC_ENV in body["error"]


async def test_debug_memory_lists_the_top_allocation_sites_behind_the_token(
    config_file: Path, no_tracing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRACEMALLOC_ENV, "1")
    async with serving(create_app(str(config_file))) as url, aiohttp.ClientSession() as http:
        assert tracemalloc.is_tracing()
        for i in range(1, 21):
            async with http.get(f"{url}/products/{i}") as resp:
                assert resp.status == 200
        status, body = await get_json(http, f"{url}/admin/debug/memory?limit=5")
        assert status == 200
        assert body["traced_bytes"] > 0 and body["peak_bytes"] >= body["traced_bytes"]
        assert 1 <= len(body["top"]) <= 5
        for site in body["top"]:
            assert site["site"].rsplit(":", 1)[1].isdigit()
            assert site["bytes"] > 0 and site["count"] > 0
            assert "tracemalloc.py" not in site["site"]
        sizes = [site["bytes"] for site in body["top"]]
        assert sizes == sorted(sizes, reverse=True)
        async with http.get(f"{url}/admin/debug/memory") as resp:
            assert resp.status == 401
        async with http.get(f"{url}/admin/debug/memory?limit=0", headers=AUTH) as resp:
            assert resp.status == 422


def test_memory_report_is_none_without_tracing_and_process_report_counts_tasks(
    no_tracing: None,
) -> None:
    if not tracemalloc.is_tracing():
        assert memory_report(10) is None

    async def count() -> int:
        sleepers = [asyncio.create_task(asyncio.sleep(1)) for _ in range(3)]
        try:
            return int(process_report()["tasks"])
        finally:
            for task in sleepers:
                task.cancel()
            await asyncio.gather(*sleepers, return_exceptions=True)

    assert asyncio.run(count()) == 4  # the main task and its three sleepers


async def test_redis_pool_stats_lend_and_return_connections(redis_url: str) -> None:
    store = redis_store(redis_url, "gwtest:diag:", 1.0)
    try:
        assert store.pool_stats() == {"in_use": 0, "idle": 0, "abandoned": 0}
        await asyncio.gather(*(store.get(f"k{i}") for i in range(5)))
        stats = store.pool_stats()
        assert stats["in_use"] == 0 and 1 <= stats["idle"] <= 5 and stats["abandoned"] == 0
    finally:
        await store.close()
