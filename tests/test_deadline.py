"""The endpoint deadline caps everything a client waits for, cache work included: time spent
waiting for another process's fan-out comes out of the fan-out's budget (found by the chaos
run, reliability/chaos.py). The real app on MariaDB, Redis and the simulators."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from cache.keys import composite_key
from cache.redis import redis_store
from gateway.app import create_app
from gateway.config import loader as config
from gateway.core.plan import build_plan
from gateway.demo.simulator import Simulators
from tests.config_files import write_config
from tests.serving import serving

DEADLINE_S = 1.0
SLOW_REVIEWS_S = 0.5
SLACK_S = 0.3  # generous for a busy machine; the bug this guards against costs 0.5 s more

CONFIG = """version: 1
cache:
  key_prefix: '{prefix}'
  url: ${{REDIS_URL}}
sources:
  catalog: {{kind: sql, dsn: "${{CATALOG_DSN}}", timeout_ms: 800}}
  reviews: {{kind: http, base_url: "${{REVIEWS_URL}}", timeout_ms: 900}}
endpoints:
  - path: /products/{{id:int}}
    deadline_ms: {deadline_ms}
    cache: {{ttl_s: 60, partial_ttl_s: 5}}
    calls:
      product:
        source: catalog
        query: "SELECT id, sku, name FROM products WHERE id = %(id)s"
        one: true
        required: true
      reviews: {{source: reviews, path: "/products/{{id}}/reviews", fallback: omit}}
"""


@pytest.fixture
def config_file(
    tmp_path: Path, redis_prefix: str, served_env: Callable[..., dict[str, str]]
) -> Path:
    served_env()
    return write_config(
        tmp_path, CONFIG.format(prefix=redis_prefix, deadline_ms=int(DEADLINE_S * 1000))
    )


async def test_waiting_for_another_processs_lock_comes_out_of_the_deadline(
    config_file: Path, sims: Simulators, http: aiohttp.ClientSession, redis_url: str
) -> None:
    loaded = config.load(str(config_file))
    plan = build_plan(loaded.config.endpoints[0], loaded.config.sources)
    key = composite_key(loaded.config.cache.key_prefix, plan.id, plan.digest, [("id", 7)])
    # Another gateway process leads the fan-out for id 7 and never stores an answer.
    other = redis_store(redis_url, loaded.config.cache.key_prefix, 1.0)
    try:
        got, _ = await other.acquire(key, uuid.uuid4().hex, 30.0)
        assert got
        sims.behaviour("reviews").delay_ms = SLOW_REVIEWS_S * 1000
        async with serving(create_app(str(config_file))) as url:
            started = time.monotonic()
            async with http.get(f"{url}/products/7") as resp:
                await resp.read()
                took = time.monotonic() - started
            # Before the fix it polled the lock for the whole deadline, then ran a fan-out with a
            # deadline of its own: 1 s + 0.5 s of slow reviews.
            assert took < DEADLINE_S + SLACK_S, took
            assert resp.status in (200, 504)
            # A request that finds no lock held still gets its whole budget: reviews arrive.
            async with http.get(f"{url}/products/8") as resp:
                assert resp.status == 200
                assert resp.headers["x-gateway-complete"] == "true"
    finally:
        await other.close()
