"""`X-Gateway-Explain: 1` with the admin token: `_explain` in that one answer, never cached,
never shown without the token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.demo.simulator import UpstreamServer, json_body
from gateway.ops.token import TOKEN_ENV
from tests.serving import serving_config
from tests.support import get
from tests.test_tracing import things_config

TOKEN = "explain-token-for-the-tests"
EXPLAIN = {"X-Gateway-Explain": "1", "Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def upstream(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[UpstreamServer]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    asked = {"a": 0}

    async def fail_once(request: web.BaseRequest) -> web.StreamResponse:
        asked["a"] += 1
        if asked["a"] == 1:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"a": 1})

    async with UpstreamServer() as server:
        server.route("/a/", fail_once)
        server.route("/b/", json_body({"b": 2}))
        yield server


async def test_a_miss_explains_key_budget_and_each_call(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    async with serving_config(things_config(upstream.url)) as url:
        status, headers, body = await get(http, f"{url}/things/1", **EXPLAIN)
    assert status == 200 and headers["x-cache"] == "MISS"
    assert headers["cache-control"] == "no-store" and "etag" not in headers
    explain = orjson.loads(body)["_explain"]
    assert explain["cache"]["state"] == "MISS" and explain["cache"]["tier"] == "memory"
    assert "/things/" in explain["cache"]["key"] and explain["cache"]["key"].endswith("id=1")
    assert explain["budget"]["deadline_ms"] == 2000.0
    assert 0 < explain["budget"]["spent_ms"] < 2000
    a, b = explain["calls"]["a"], explain["calls"]["b"]
    assert a["outcome"] == "ok" and a["attempts"] == 2 and a["breaker"] == "none"
    assert b["outcome"] == "ok" and b["attempts"] == 1 and b["hedges"] == 0
    for call in (a, b):
        assert 0 <= call["start_ms"] <= call["end_ms"] <= explain["budget"]["spent_ms"]
    assert len(explain["trace_id"]) == 32


async def test_a_hit_explains_what_it_served_and_the_stored_bytes_stay_clean(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    async with serving_config(things_config(upstream.url)) as url:
        _, _, first = await get(http, f"{url}/things/1", **EXPLAIN)
        status, headers, body = await get(http, f"{url}/things/1", **EXPLAIN)
        _, plain_headers, plain = await get(http, f"{url}/things/1")
    assert status == 200 and headers["x-cache"] == "HIT"
    explain = orjson.loads(body)["_explain"]
    assert explain["cache"]["state"] == "HIT" and explain["cache"]["tier"] == "memory"
    assert explain["cache"]["key"] == orjson.loads(first)["_explain"]["cache"]["key"]
    assert explain["cache"]["age_s"] >= 0 and explain["calls"] == {}
    assert plain_headers["x-cache"] == "HIT" and b"_explain" not in plain
    assert orjson.loads(plain) == {k: v for k, v in orjson.loads(body).items() if k != "_explain"}


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Gateway-Explain": "1"},
        {"X-Gateway-Explain": "1", "Authorization": "Bearer not-the-token-at-all"},
        {"X-Gateway-Explain": "1", "Authorization": f"Basic {TOKEN}"},
        {"X-Gateway-Explain": "0", "Authorization": f"Bearer {TOKEN}"},
    ],
)
async def test_without_the_token_the_header_is_ignored(
    upstream: UpstreamServer, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with serving_config(things_config(upstream.url)) as url:
        status, answer_headers, body = await get(http, f"{url}/things/1", **headers)
    assert status == 200 and b"_explain" not in body
    assert answer_headers["cache-control"].startswith("public")


async def test_without_admin_there_is_no_explain(
    upstream: UpstreamServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV)
    async with serving_config(things_config(upstream.url)) as url:
        status, _, body = await get(http, f"{url}/things/1", **EXPLAIN)
    assert status == 200 and b"_explain" not in body


async def test_a_token_mounted_with_a_final_newline_opens_admin_and_explain_alike(
    upstream: UpstreamServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Kubernetes secret mounted from a file keeps its trailing newline; clients send the
    # token without it. Both checks must agree: once admin said 401 while explain said yes.
    monkeypatch.setenv(TOKEN_ENV, TOKEN + "\n")
    async with serving_config(things_config(upstream.url)) as url:
        status, _, body = await get(http, f"{url}/things/1", **EXPLAIN)
        assert status == 200 and "_explain" in orjson.loads(body)
        async with http.get(
            f"{url}/admin/sources", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 200
