"""The admin API, /readyz and secrets: the real app on MariaDB, Redis and loopback services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from cache.keys import composite_key
from gateway.app import create_app
from gateway.config.schema import GatewayConfig
from gateway.core.plan import build_plan
from gateway.demo.simulator import Simulators
from tests.config_files import config_text, read, write_atomically, write_config
from tests.serving import serving
from tests.support import free_port

PRODUCTS = 500
TOKEN = "admin-token-for-tests"
SECRET = "pr1cing-s3cret-Zq8"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def env(served_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return served_env(TOKEN, PRICING_TOKEN=SECRET)


@pytest.fixture
def config_file(tmp_path: Path, redis_prefix: str) -> Path:
    return write_config(tmp_path, config_text(redis_prefix))


@pytest.fixture
async def gateway(env: dict[str, str], config_file: Path) -> AsyncIterator[str]:
    async with serving(create_app(str(config_file))) as url:
        yield url


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as resp:
        body = await resp.read()
        is_json = resp.content_type == "application/json"
        return resp.status, orjson.loads(body) if is_json else body.decode()


async def test_admin_is_absent_when_no_token_is_set(
    env: dict[str, str],
    config_file: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN")
    async with serving(create_app(str(config_file))) as url:
        for method, path in [
            ("GET", "/admin/config"),
            ("GET", "/admin/sources"),
            ("GET", "/admin/dashboard"),
            ("POST", "/admin/reload"),
            ("POST", "/admin/cache/purge"),
        ]:
            status, _ = await call(http, method, f"{url}{path}", headers=AUTH)
            assert status == 404, path


async def test_admin_needs_the_bearer_token(gateway: str, http: aiohttp.ClientSession) -> None:
    wrong = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer "},
    ]
    for headers in wrong:
        status, body = await call(http, "GET", f"{gateway}/admin/config", headers=headers)
        assert status == 401, headers
        assert TOKEN not in str(body)
    # The query-string form is for the dashboard page a browser opens; never for a POST.
    status, _ = await call(http, "POST", f"{gateway}/admin/reload?token={TOKEN}")
    assert status == 401
    status, _ = await call(http, "GET", f"{gateway}/admin/config", headers=AUTH)
    assert status == 200


async def test_admin_config_is_the_effective_config_with_secrets_redacted(
    gateway: str, http: aiohttp.ClientSession, env: dict[str, str]
) -> None:
    status, body = await call(http, "GET", f"{gateway}/admin/config", headers=AUTH)
    assert status == 200
    pricing = body["config"]["sources"]["pricing"]
    assert pricing["headers"] == {"Authorization": "Bearer ***"}
    assert pricing["base_url"] == env["PRICING_URL"]
    assert pricing["timeout_ms"] == 1500
    assert SECRET not in orjson.dumps(body).decode()


async def test_sources_report_percentiles_outcomes_breaker_pool_and_a_suggested_timeout(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    for i in range(1, 81):  # distinct ids: every request is a miss and runs the fan-out
        status, _ = await call(http, "GET", f"{gateway}/products/{i}")
        assert status == 200
    status, report = await call(http, "GET", f"{gateway}/admin/sources", headers=AUTH)
    assert status == 200
    sources = report["sources"]
    assert set(sources) == {"catalog", "pricing", "inventory", "reviews", "recs"}
    for name, s in sources.items():
        assert s["count"] == 80, name
        assert s["outcomes"]["ok"] == 80 and s["ratios"]["ok"] == 1.0
        assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] < 1000
        assert s["cut_by_timeout"] == 0.0
        suggested = s["suggested_timeout_ms"]
        assert suggested % 5 == 0 and suggested >= s["ok_p99_ms"] * 1.25 - 0.01, s
        assert s["pool"]["in_use"] == 0 and s["pool"]["max"] >= 1
    assert sources["pricing"]["breaker"] == "closed"
    assert sources["inventory"]["breaker"] is None
    assert sources["catalog"]["kind"] == "sql" and sources["catalog"]["timeout_ms"] == 2000
    assert report["cache"]["lookups"] == 80 and report["cache"]["hit_ratio"] == 0.0
    await call(http, "GET", f"{gateway}/products/1")
    _, report = await call(http, "GET", f"{gateway}/admin/sources", headers=AUTH)
    assert report["cache"]["hits"] == 1


async def test_sources_report_the_share_cut_by_the_timeout(
    gateway: str,
    http: aiohttp.ClientSession,
    sims: Simulators,
    config_file: Path,
    redis_prefix: str,
) -> None:
    sims.behaviour("inventory").update({"delay_ms": 400})  # its timeout is 100 ms
    write_atomically(
        config_file, config_text(redis_prefix, {"timeout_ms: 1000}": "timeout_ms: 100}"})
    )
    status, _ = await call(http, "POST", f"{gateway}/admin/reload", headers=AUTH)
    assert status == 200
    for i in range(1, 11):
        status, doc = await call(http, "GET", f"{gateway}/products/{i}")
        assert status == 200 and doc["_meta"]["sources"] == {"stock": "timeout"}
    _, report = await call(http, "GET", f"{gateway}/admin/sources", headers=AUTH)
    inventory = report["sources"]["inventory"]
    assert inventory["outcomes"]["timeout"] == 10
    assert inventory["cut_by_timeout"] == 1.0
    assert 95 <= inventory["p50_ms"] <= 150  # cut at the timeout, not at the service's 400 ms
    assert inventory["suggested_timeout_ms"] is None
    assert "cut at 100 ms" in inventory["suggestion"]


async def test_cache_purge_by_tag_and_by_key(gateway: str, http: aiohttp.ClientSession) -> None:
    url = f"{gateway}/products/7"
    for expected in ("MISS", "HIT"):
        async with http.get(url) as resp:
            assert resp.headers["X-Cache"] == expected
    status, body = await call(
        http, "POST", f"{gateway}/admin/cache/purge", headers=AUTH, json={"tags": ["product:7"]}
    )
    assert (status, body) == (200, {"removed": 1})
    async with http.get(url) as resp:
        assert resp.headers["X-Cache"] == "MISS"

    status, config = await call(http, "GET", f"{gateway}/admin/config", headers=AUTH)
    cfg = GatewayConfig.model_validate(config["config"])
    plan = build_plan(cfg.endpoints[0], cfg.sources)
    key = composite_key(cfg.cache.key_prefix, plan.id, plan.digest, [("id", 7)])
    status, body = await call(
        http, "POST", f"{gateway}/admin/cache/purge", headers=AUTH, json={"keys": [key]}
    )
    assert (status, body) == (200, {"removed": 1})
    status, body = await call(
        http, "POST", f"{gateway}/admin/cache/purge", headers=AUTH, json={"keys": [key]}
    )
    assert (status, body) == (200, {"removed": 0})
    status, _ = await call(http, "POST", f"{gateway}/admin/cache/purge", headers=AUTH, json={})
    assert status == 422


async def test_readyz_is_ready_when_every_source_and_the_cache_answer(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    status, body = await call(http, "GET", f"{gateway}/readyz")
    assert status == 200 and body["status"] == "ready"
    names = {"catalog", "pricing", "inventory", "reviews", "recs"}
    assert set(body["sources"]) == names
    assert {s["state"] for s in body["sources"].values()} == {"up"}
    assert body["cache"]["state"] == "up"


async def test_readyz_stays_ready_and_reports_the_sql_server_down_by_name(
    env: dict[str, str],
    config_file: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("CATALOG_DSN", f"mysql://root@127.0.0.1:{closed}/catalog")
    async with serving(create_app(str(config_file))) as url:
        status, body = await call(http, "GET", f"{url}/readyz")
        for _ in range(50):  # bounded: the first ping may still be in flight
            if body["sources"]["catalog"]["state"] != "unknown":
                break
            await asyncio.sleep(0.2)
            status, body = await call(http, "GET", f"{url}/readyz")
        # Every instance shares the database: its outage must not pull them all out at once.
        assert status == 200
        assert body["sources"]["catalog"]["state"] == "down"
        assert body["sources"]["catalog"]["reason"] in ("unavailable", "timeout")
        assert str(closed) not in str(body)
        status, _ = await call(http, "GET", f"{url}/healthz")
        assert status == 200


async def test_dashboard_page_is_served_behind_the_token(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    status, page = await call(http, "GET", f"{gateway}/admin/dashboard")
    assert status == 401
    for kwargs in ({"headers": AUTH}, {"params": {"token": TOKEN}}):
        async with http.get(f"{gateway}/admin/dashboard", **kwargs) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
    assert "/admin/sources" in page
    assert "http://" not in page and "https://" not in page  # no external assets


async def test_no_secret_reaches_logs_admin_or_error_answers(
    env: dict[str, str],
    config_file: Path,
    sims: Simulators,
    http: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    async with serving(create_app(str(config_file))) as url:
        sims.behaviour("pricing").update({"error_rate": 1.0})
        for i in range(1, 6):
            seen.append(str(await call(http, "GET", f"{url}/products/{i}")))
        for path in ("/admin/config", "/admin/sources", "/readyz", "/metrics"):
            seen.append(str(await call(http, "GET", f"{url}{path}", headers=AUTH)))
        # A refused reload and a failing required source: their errors must not carry it either.
        good = read(config_file)
        write_atomically(config_file, good.replace("source: pricing", "source: pricng"))
        seen.append(str(await call(http, "POST", f"{url}/admin/reload", headers=AUTH)))
        write_atomically(config_file, good)
        monkeypatch.setenv("CATALOG_DSN", f"mysql://root:{SECRET}@127.0.0.1:{free_port()}/x")
        seen.append(str(await call(http, "POST", f"{url}/admin/reload", headers=AUTH)))
        seen.append(str(await call(http, "GET", f"{url}/products/9")))
        seen.append(str(await call(http, "GET", f"{url}/readyz")))
        seen.append(str(await call(http, "GET", f"{url}/admin/config", headers=AUTH)))
    out, err = capfd.readouterr()
    assert '"request"' in err or "request" in err  # the access log was captured at all
    for text in [*seen, out, err]:
        assert SECRET not in text
    assert seen[-5].startswith("(400, ") and "unknown source 'pricng'" in seen[-5]
    assert seen[-4].startswith("(200, ")  # reloaded: the new catalog pool starts empty
    assert seen[-3].startswith("(502, ")  # the required catalog call failed
    assert seen[-2].startswith("(200, ")  # ready: the catalog is reported down by name
    assert ":***@" in seen[-1]
