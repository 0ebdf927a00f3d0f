"""/metrics and the access log: the real app on MariaDB, Redis and loopback services, in one
process and under `gateway serve --workers 2`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.demo.simulator import Simulators
from tests.config_files import (
    config_text,
    gateway_process,
    read,
    server_env,
    write_config,
)
from tests.serving import serving
from tests.support import free_port

PRODUCTS = 500
ENDPOINT = "GET /products/{id:int}"
CALLS = {
    "product": "catalog",
    "price": "pricing",
    "stock": "inventory",
    "reviews": "reviews",
    "recommendations": "recs",
}


@pytest.fixture
def env(served_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return served_env(admin_token=None)


@pytest.fixture
def config_file(env: dict[str, str], tmp_path: Path, redis_prefix: str) -> Callable[..., Path]:
    """Return a writer of the test config, with `edits` made, for a gateway served in-process."""

    def write(edits: dict[str, str] | None = None) -> Path:
        return write_config(tmp_path, config_text(redis_prefix, edits))

    return write


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Return every sample of a text exposition by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def scrape(
    http: aiohttp.ClientSession, base: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return samples(await resp.text())


async def test_metrics_count_requests_calls_cache_pools_and_breakers(
    config_file: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    path = config_file()
    async with serving(create_app(str(path))) as base:
        for i in (1, 2, 3, 1, 1):
            async with http.get(f"{base}/products/{i}") as resp:
                assert resp.status == 200
        async with http.get(f"{base}/products/0") as resp:
            assert resp.status == 404
        async with http.get(f"{base}/nowhere/at/all") as resp:
            assert resp.status == 404
        found = await scrape(http, base)
    assert value(found, "gateway_requests_total", endpoint=ENDPOINT, status="200") == 5
    assert value(found, "gateway_requests_total", endpoint=ENDPOINT, status="404") == 1
    assert value(found, "gateway_requests_total", endpoint="unmatched", status="404") == 1
    assert value(found, "gateway_request_duration_seconds_count", endpoint=ENDPOINT) == 6
    for call, source in CALLS.items():
        assert (
            value(found, "gateway_call_outcomes_total", source=source, call=call, outcome="ok") == 3
        )
        assert value(found, "gateway_call_duration_seconds_count", source=source, call=call) >= 3
    assert (
        value(
            found,
            "gateway_call_outcomes_total",
            source="catalog",
            call="product",
            outcome="not_found",
        )
        == 1
    )
    assert value(found, "gateway_cache_events_total", event="miss") == 4
    assert value(found, "gateway_cache_events_total", event="hit") == 2
    assert ("gateway_singleflight_waits_total", frozenset()) in found
    for source in CALLS.values():
        assert value(found, "gateway_pool_max", source=source) >= 1
        assert value(found, "gateway_pool_in_use", source=source) == 0
        assert ("gateway_pool_size", frozenset({("source", source)})) in found
    assert value(found, "gateway_pool_max", source="catalog") == 20
    assert value(found, "gateway_pool_size", source="catalog") >= 2  # pool: {min: 2}
    assert value(found, "gateway_breaker_state", source="pricing") == 0


async def test_metrics_count_retries_fallbacks_and_breaker_transitions(
    config_file: Callable[..., Path],
    http: aiohttp.ClientSession,
    sims: Simulators,
) -> None:
    path = config_file({"min_calls: 20": "min_calls: 5"})
    sims.behaviour("pricing").update({"error_rate": 1.0})
    async with serving(create_app(str(path))) as base:
        for i in range(1, 21):
            async with http.get(f"{base}/products/{i}") as resp:
                assert resp.status == 200
                assert "price" in (await resp.json())["_meta"]["sources"]
        found = await scrape(http, base)
    errors = value(
        found, "gateway_call_outcomes_total", source="pricing", call="price", outcome="error"
    )
    rejected = value(
        found, "gateway_call_outcomes_total", source="pricing", call="price", outcome="circuit_open"
    )
    assert errors >= 5 and rejected >= 1 and errors + rejected == 20
    assert value(found, "gateway_retries_total", source="pricing") >= 1
    assert value(found, "gateway_call_fallbacks_total", source="pricing", call="price") == 20
    assert value(found, "gateway_call_fallbacks_total", source="inventory", call="stock") == 0
    assert value(found, "gateway_breaker_transitions_total", source="pricing", state="open") == 1
    assert value(found, "gateway_breaker_state", source="pricing") == 2


async def test_metrics_count_hedges(
    config_file: Callable[..., Path],
    http: aiohttp.ClientSession,
    sims: Simulators,
) -> None:
    reviews = '9103}", timeout_ms: 2000}'
    hedged = '9103}", timeout_ms: 2000, hedge: {after_ms: 30}}'
    path = config_file({reviews: hedged})
    sims.behaviour("reviews").update({"delay_ms": 80})  # every first request is late
    async with serving(create_app(str(path))) as base:
        for i in range(1, 4):
            async with http.get(f"{base}/products/{i}") as resp:
                assert resp.status == 200
                assert "reviews" not in (await resp.json())["_meta"]["sources"]
        found = await scrape(http, base)
    assert value(found, "gateway_hedges_total", source="reviews") == 3
    assert sims.counts()["reviews"] == 6


async def test_metrics_add_up_across_workers(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, config_text(redis_prefix))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(sims, catalog_dsn, redis_url, admin_token=None)
    requests = 60
    logs = tmp_path / "gateway.log"
    async with gateway_process(path, port, env, logs, "--workers", "2"):
        # A fresh connection per request, so the kernel spreads them over both workers.
        for i in range(1, requests + 1):
            async with aiohttp.ClientSession() as http, http.get(f"{base}/products/{i}") as resp:
                assert resp.status == 200
        await asyncio.sleep(1.5)  # each worker samples its pools once a second
        async with aiohttp.ClientSession() as http:
            found = await scrape(http, base)
    assert value(found, "gateway_requests_total", endpoint=ENDPOINT, status="200") == requests
    assert (
        value(found, "gateway_call_outcomes_total", source="pricing", call="price", outcome="ok")
        == requests
    )
    assert value(found, "gateway_cache_events_total", event="miss") == requests
    # Two workers, each with its own pools: the maxima add up.
    assert value(found, "gateway_pool_max", source="pricing") == 200
    assert value(found, "gateway_breaker_state", source="pricing") == 0


async def test_access_log_has_one_json_line_per_request_with_its_calls(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, config_text(redis_prefix))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(sims, catalog_dsn, redis_url, admin_token=None)
    sims.behaviour("reviews").update({"error_rate": 1.0})
    logs = tmp_path / "gateway.log"
    async with gateway_process(path, port, env, logs), aiohttp.ClientSession() as http:
        for rid in ("log-req-1", "log-req-2"):
            async with http.get(f"{base}/products/8", headers={"X-Request-ID": rid}) as resp:
                assert resp.status == 200
    lines = [json.loads(line) for line in read(logs).splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("event") == "request"}
    first, second = access["log-req-1"], access["log-req-2"]
    assert first["endpoint"] == ENDPOINT and first["status"] == 200
    assert first["path"] == "/products/8" and first["level"] == "info"
    assert isinstance(first["ms"], float) and first["ms"] > 0
    assert first["cache"] == "MISS" and first["complete"] is False
    assert set(first["calls"]) == set(CALLS)
    assert first["calls"]["reviews"]["outcome"] == "error"
    assert first["calls"]["price"]["outcome"] == "ok"
    assert all(isinstance(c["ms"], float) for c in first["calls"].values())
    # When its fan-out began (after the cache lookup) and how long it ran, inside the total.
    began, ran = first["fanout"]  # each rounded to 0.1 ms
    assert began >= 0 and ran >= max(c["ms"] for c in first["calls"].values()) - 0.1
    assert began + ran <= first["ms"] + 0.1
    # Partial answers are cached briefly: the second is a hit and ran no calls.
    assert second["cache"] == "HIT" and second["calls"] is None and second["fanout"] is None


async def test_console_log_format_is_readable(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, config_text(redis_prefix))
    port = free_port()
    env = {
        **server_env(sims, catalog_dsn, redis_url, admin_token=None),
        "GATEWAY_LOG_FORMAT": "console",
    }
    logs = tmp_path / "gateway.log"
    async with gateway_process(path, port, env, logs), aiohttp.ClientSession() as http:
        async with http.get(
            f"http://127.0.0.1:{port}/products/4", headers={"X-Request-ID": "console-req"}
        ) as resp:
            assert resp.status == 200
    text = read(logs)
    (line,) = [line for line in text.splitlines() if "console-req" in line]
    assert not line.lstrip().startswith("{")
    assert "request" in line and "/products/4" in line and "status" in line
