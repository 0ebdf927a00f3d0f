"""Request headers reach upstreams only where a call forwards them, and vary the cache key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis

from gateway.config import loader as config
from gateway.core.errors import ConfigError
from gateway.demo.simulator import UpstreamServer, echo
from tests.serving import serving_config

CONFIG = """\
version: 1
cache: {{url: "memory://"}}
sources:
  content: {{kind: http, base_url: "{base}", timeout_ms: 500}}
endpoints:
  - path: /things/{{id:int}}
    deadline_ms: 1000
    cache: {{ttl_s: 60, vary: [{vary}]}}
    calls:
      thing:
        source: content
        path: /t/{{id}}
        forward_headers: [{forward}]
        required: true
"""


def text(
    base: str = "http://127.0.0.1:9",
    vary: str = "Accept-Language",
    forward: str = "Accept-Language",
) -> str:
    return CONFIG.format(base=base, vary=vary, forward=forward)


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        server.route("/", echo())
        yield server


def test_a_forwarded_header_missing_from_the_cache_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        config.loads(text(vary="", forward="Authorization"), "gw.yaml", {})
    (problem,) = info.value.problems
    assert str(problem).startswith(
        "gw.yaml:13: endpoints.0.calls.thing.forward_headers: "
        "forwards Authorization but the endpoint's cache key"
    )


def test_sql_calls_cannot_forward_headers() -> None:
    bad = (
        text()
        .replace(
            'content: {kind: http, base_url: "http://127.0.0.1:9", timeout_ms: 500}',
            'content: {kind: sql, dsn: "sqlite:///x.db", timeout_ms: 500}',
        )
        .replace("path: /t/{id}", 'query: "SELECT %(id)s"')
    )
    with pytest.raises(ConfigError) as info:
        config.loads(bad, "gw.yaml", {})
    assert any("only http calls forward request headers" in str(p) for p in info.value.problems)


async def test_forwarded_header_reaches_the_upstream_and_varies_the_cache(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    loaded = config.loads(text(base=upstream.url), "gw.yaml", {})
    async with serving_config(loaded) as url:

        async def get(lang: str) -> tuple[str, str, dict[str, str]]:
            headers = {
                "Accept-Language": lang,
                "Cookie": "session=secret",
                "Authorization": "Bearer user-token",
            }
            async with http.get(f"{url}/things/7", headers=headers) as resp:
                assert resp.status == 200
                doc = await resp.json()
                return resp.headers["X-Cache"], resp.headers["Vary"], doc["thing"]["headers"]

        state, vary, seen = await get("fr")
        assert (state, vary) == ("MISS", "accept-language")
        assert seen["Accept-Language"] == "fr"
        assert "Cookie" not in seen and "Authorization" not in seen  # only what is forwarded
        state, _, seen = await get("de")
        assert state == "MISS" and seen["Accept-Language"] == "de"  # another key
        state, _, seen = await get("fr")
        assert state == "HIT" and seen["Accept-Language"] == "fr"  # the French answer, kept
    assert len(upstream.seen) == 2


async def test_an_answer_that_varies_by_authorization_is_private(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    loaded = config.loads(
        text(base=upstream.url, vary="Authorization", forward="Authorization"), "gw.yaml", {}
    )
    async with serving_config(loaded) as url:
        for token, expected in (("a", "a"), ("b", "b"), ("a", "a")):
            async with http.get(
                f"{url}/things/1", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                doc = await resp.json()
                assert doc["thing"]["headers"]["Authorization"] == f"Bearer {expected}"
                assert resp.headers["Cache-Control"].startswith("private, max-age=")
    assert len(upstream.seen) == 2  # user a's second request was a hit on a's own entry


async def test_a_varied_header_value_never_appears_in_a_redis_key(
    upstream: UpstreamServer, http: aiohttp.ClientSession, redis_url: str, redis_prefix: str
) -> None:
    # Key names are seen by SCAN, MONITOR, the slowlog and purges by key: a bearer token or a
    # session cookie that varies the cache key is part of it only as a digest.
    token = "Bearer s3cr3t-user-token-77f1"
    yaml = text(base=upstream.url, vary="Authorization", forward="Authorization").replace(
        'cache: {url: "memory://"}', f'cache: {{url: "{redis_url}", key_prefix: "{redis_prefix}"}}'
    )
    async with serving_config(config.loads(yaml, "gw.yaml", {})) as url:
        for state in ("MISS", "HIT"):
            async with http.get(f"{url}/things/1", headers={"Authorization": token}) as resp:
                assert resp.status == 200 and resp.headers["X-Cache"] == state
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k.decode() for k in client.scan_iter(match=f"*{redis_prefix}*", count=1000)]
    finally:
        client.close()
    assert keys  # the entry was stored under the test's prefix
    assert not [k for k in keys if "s3cr3t" in k or "user-token" in k]
