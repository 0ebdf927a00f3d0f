"""An upstream's Cache-Control bounds the composite: no-store and private keep it out of the
cache (and never `public`), max-age and s-maxage cap its freshness, unless the call ignores it."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from cache.directives import Directives, parse_cache_control
from cache.entry import _HEADER_V1, NO_CAP, Entry, decode, encode, make_entry, servable
from cache.policy import CachePolicy
from cache.redis import redis_store
from gateway.config import loader as config
from gateway.demo.simulator import Handler, UpstreamServer
from tests.serving import serving_config

CONFIG = """\
version: 1
cache: {{url: "{cache}", key_prefix: "{prefix}"}}
sources:
  up: {{kind: http, base_url: "{base}", timeout_ms: 500}}
endpoints:
  - path: /things/{{id:int}}
    deadline_ms: 1000
    cache: {{ttl_s: 60, stale_while_revalidate_s: 0}}
    calls:
      a: {{source: up, path: "/a/{{id}}", required: true}}
      b: {{source: up, path: "/b/{{id}}", ignore_upstream_cache_control: {ignore}}}
"""


class Upstream:
    """Answers /a/ and /b/ with the Cache-Control set for each, counting requests."""

    def __init__(self) -> None:
        self.headers: dict[str, dict[str, str]] = {"a": {}, "b": {}}
        self.count = 0

    def handler(self, name: str) -> Handler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            self.count += 1
            return web.json_response({"n": name}, headers=self.headers[name])

        return handle


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[UpstreamServer, Upstream]]:
    up = Upstream()
    async with UpstreamServer() as server:
        server.route("/a/", up.handler("a"))
        server.route("/b/", up.handler("b"))
        yield server, up


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def prefix(cache_url: str, request: pytest.FixtureRequest) -> str:
    if cache_url.startswith("memory"):
        return "gw:"
    return str(request.getfixturevalue("redis_prefix"))


def loaded(base: str, cache: str, prefix: str, ignore: bool = False) -> config.LoadedConfig:
    text = CONFIG.format(base=base, cache=cache, prefix=prefix, ignore=str(ignore).lower())
    return config.loads(text, "gw.yaml", {})


async def get(http: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    async with http.get(f"{url}/things/1") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Gateway-Complete"] == "true"
        return resp.headers["X-Cache"], resp.headers["Cache-Control"]


def max_age(cache_control: str) -> int:
    scope, _, age = cache_control.partition(", max-age=")
    assert scope == "public", cache_control
    return int(age)


@pytest.mark.parametrize("directive", ["no-store", "no-cache, no-store, max-age=0"])
async def test_no_store_on_one_call_keeps_the_composite_out_of_the_cache(
    upstream: tuple[UpstreamServer, Upstream],
    http: aiohttp.ClientSession,
    cache_url: str,
    prefix: str,
    directive: str,
) -> None:
    server, up = upstream
    up.headers["a"] = {"Cache-Control": directive}
    async with serving_config(loaded(server.url, cache_url, prefix)) as url:
        assert await get(http, url) == ("MISS", "no-store")
        assert await get(http, url) == ("MISS", "no-store")  # never stored
    assert up.count == 4


async def test_private_on_one_call_is_never_stored_and_private_for_the_client(
    upstream: tuple[UpstreamServer, Upstream],
    http: aiohttp.ClientSession,
    cache_url: str,
    prefix: str,
) -> None:
    server, up = upstream
    up.headers["b"] = {"Cache-Control": "private, max-age=20"}
    async with serving_config(loaded(server.url, cache_url, prefix)) as url:
        assert await get(http, url) == ("MISS", "private, max-age=20")
        assert await get(http, url) == ("MISS", "private, max-age=20")
    assert up.count == 4


async def test_max_age_caps_the_stored_entry_and_the_reply(
    upstream: tuple[UpstreamServer, Upstream],
    http: aiohttp.ClientSession,
    cache_url: str,
    prefix: str,
) -> None:
    server, up = upstream
    up.headers["a"] = {"Cache-Control": "public, max-age=30"}
    up.headers["b"] = {"Cache-Control": "max-age=1"}  # the smallest wins
    async with serving_config(loaded(server.url, cache_url, prefix)) as url:
        state, cc = await get(http, url)
        assert state == "MISS" and max_age(cc) in (0, 1)
        state, cc = await get(http, url)
        assert state == "HIT" and max_age(cc) in (0, 1)
        await asyncio.sleep(1.2)
        state, cc = await get(http, url)
        assert state == "MISS"  # fresh for 1 s, not the endpoint's 60
    assert up.count == 4


async def test_s_maxage_wins_over_max_age_and_huge_values_are_capped_by_the_ttl(
    upstream: tuple[UpstreamServer, Upstream],
    http: aiohttp.ClientSession,
    cache_url: str,
    prefix: str,
) -> None:
    server, up = upstream
    up.headers["a"] = {"Cache-Control": "max-age=1, s-maxage=30"}
    up.headers["b"] = {"Cache-Control": "max-age=99999999999999999999"}
    async with serving_config(loaded(server.url, cache_url, prefix)) as url:
        state, cc = await get(http, url)
        assert state == "MISS" and 29 <= max_age(cc) <= 30
        state, cc = await get(http, url)
        assert state == "HIT" and 29 <= max_age(cc) <= 30
    assert up.count == 2


async def test_invalid_directives_are_ignored(
    upstream: tuple[UpstreamServer, Upstream],
    http: aiohttp.ClientSession,
    cache_url: str,
    prefix: str,
) -> None:
    server, up = upstream
    up.headers["a"] = {"Cache-Control": "max-age=-1, max-age=x, max-age=1e3, " + "junk," * 1000}
    async with serving_config(loaded(server.url, cache_url, prefix)) as url:
        state, cc = await get(http, url)
        assert state == "MISS" and 59 <= max_age(cc) <= 60
        state, _ = await get(http, url)
        assert state == "HIT"


async def test_a_call_may_ignore_its_upstreams_cache_control(
    upstream: tuple[UpstreamServer, Upstream],
    http: aiohttp.ClientSession,
    cache_url: str,
    prefix: str,
) -> None:
    server, up = upstream
    up.headers["b"] = {"Cache-Control": "no-store, private, max-age=0"}
    async with serving_config(loaded(server.url, cache_url, prefix, ignore=True)) as url:
        state, cc = await get(http, url)
        assert state == "MISS" and 59 <= max_age(cc) <= 60
        state, cc = await get(http, url)
        assert state == "HIT" and 59 <= max_age(cc) <= 60
    assert up.count == 2


async def test_a_redis_entry_keeps_its_cap_for_another_instance(
    upstream: tuple[UpstreamServer, Upstream],
    http: aiohttp.ClientSession,
    redis_url: str,
    redis_prefix: str,
) -> None:
    server, up = upstream
    up.headers["a"] = {"Cache-Control": "max-age=1"}
    config = loaded(server.url, redis_url, redis_prefix)
    async with serving_config(config) as first, serving_config(config) as second:
        state, _ = await get(http, first)
        assert state == "MISS"
        state, cc = await get(http, second)
        assert state == "HIT" and max_age(cc) in (0, 1)  # the cap came from Redis
        await asyncio.sleep(1.2)
        state, _ = await get(http, second)
        assert state == "MISS"
    assert up.count == 4


# --- parsing and the entry codec --------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((), None),
        (("public",), None),
        (("public, max-age=30",), Directives(max_age_s=30)),
        (("Max-Age=30", "max-age=10"), Directives(max_age_s=10)),  # repeated: the smallest
        (("max-age=10, s-maxage=300",), Directives(max_age_s=300)),  # shared caches: s-maxage
        (('max-age="5"',), Directives(max_age_s=5)),
        (("no-cache, s-maxage=300",), Directives(max_age_s=0)),
        (("NO-STORE",), Directives(no_store=True)),
        (('private="Set-Cookie", max-age=9',), Directives(private=True, max_age_s=9)),
        (("max-age=-1, max-age=, max-age=abc, max-age=1.5, max-age=²",), None),
        (("max-age=99999999999999",), Directives(max_age_s=2**31)),
        (("max-age=" + "9" * 5000,), Directives(max_age_s=2**31)),
        (("public," * 1000 + "no-store",), None),  # past the bounds: not read
        (("a" * 100_000,), None),
    ],
)
def test_cache_control_is_parsed_boundedly(
    values: tuple[str, ...], expected: Directives | None
) -> None:
    assert parse_cache_control(values) == expected


def test_parsing_a_huge_header_is_bounded() -> None:
    t0 = time.perf_counter()
    for _ in range(100):
        parse_cache_control(["max-age=1," * 100_000] * 50)
    assert time.perf_counter() - t0 < 2.0  # each parse reads 1 KB, not 5 MB


def test_a_capped_entry_round_trips_and_old_entries_read_as_uncapped() -> None:
    entry = make_entry(200, b'{"a":1}', True, Directives(max_age_s=7))
    back = decode(encode(entry))
    assert (back.max_age_s, back.body, back.etag) == (7.0, entry.body, entry.etag)
    assert decode(encode(make_entry(200, b"{}", True))).max_age_s == math.inf
    v1 = _HEADER_V1.pack(b"GW", 1, 1, 200, entry.written_at, len(entry.etag)) + b"".join(
        (entry.etag.encode(), entry.body)
    )
    old = decode(v1)
    assert (old.max_age_s, old.body, old.complete, old.etag) == (
        math.inf,
        entry.body,
        True,
        entry.etag,
    )


@pytest.mark.parametrize("directives", [Directives(no_store=True), Directives(private=True)])
def test_an_entry_no_shared_cache_may_keep_is_never_encoded(directives: Directives) -> None:
    entry = make_entry(200, b"{}", True, directives)
    assert CachePolicy(60, 0, 30, 30, 30, False).ttl_for(entry) == 0.0
    with pytest.raises(ValueError, match="never stored"):
        encode(entry)


def entry_at(written_at: float, status: int = 200, cap: float = math.inf) -> Entry:
    made = make_entry(status, b"{}", True, Directives(max_age_s=cap))
    return Entry(made.status, made.body, True, written_at, made.etag, cap)


# (age, status, cap) -> servable, for ttl 60, swr 5, not-found ttl 30.
CASES: list[tuple[float, int, float, bool]] = [
    (3.0, 200, 10, True),
    (12.0, 200, 10, True),  # within cap + swr
    (16.0, 200, 10, False),
    (50.0, 200, NO_CAP, True),
    (64.0, 200, 1000, True),  # the policy's ttl + swr still bounds it
    (66.0, 200, 1000, False),
    (0.5, 200, 0, False),
    (5.0, 404, 10, True),
    (11.0, 404, 10, False),  # no stale window for a 404
]


@pytest.mark.parametrize(("age", "status", "cap", "expected"), CASES)
async def test_redis_lookup_and_servable_agree_on_capped_entries(
    redis_url: str, redis_prefix: str, age: float, status: int, cap: float, expected: bool
) -> None:
    policy = CachePolicy(60, 0, 5, 0, 30, False)
    now = time.time()
    entry = entry_at(now - age, status, math.inf if cap == NO_CAP else cap)
    data = encode(entry)
    assert servable(data, policy.windows, now) is expected
    assert (age < policy.window_for(entry)) is expected
    store = redis_store(redis_url, redis_prefix, 1.0)
    try:
        await store.put("k", data, 100, ())
        got, back = await store.lookup("k", "token", 1.0, policy.windows, now)
        assert back == data and got is not expected  # the lock is taken only to recompute
    finally:
        await store.close()


LISTING = """\
version: 1
cache: {{url: "memory://"}}
sources:
  up: {{kind: http, base_url: "{base}", timeout_ms: 500}}
endpoints:
  - path: /things/{{id:int}}
    deadline_ms: 1000
    cache: {{ttl_s: 60}}
    calls:
      a:
        source: up
        path: "/a/{{id}}"
        required: true
        batch: {{path: /a, query: {{ids: "{{id*}}"}}, key: id, max: 10}}
  - path: /things
    deadline_ms: 1000
    list: {{item: "/things/{{id:int}}", ids: {{query: ids, max: 10}}}}
"""


async def test_a_batch_answers_cache_control_binds_each_item_it_holds(
    http: aiohttp.ClientSession,
) -> None:
    async def batch(request: web.BaseRequest) -> web.StreamResponse:
        ids = request.query["ids"].split(",")
        return web.json_response(
            [{"id": int(i)} for i in ids], headers={"Cache-Control": "max-age=1"}
        )

    async with UpstreamServer() as server:
        server.route("/a", batch)
        loaded = config.loads(LISTING.format(base=server.url), "gw.yaml", {})
        async with serving_config(loaded) as url:
            async with http.get(f"{url}/things?ids=1,2") as resp:
                assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
                assert max_age(resp.headers["Cache-Control"]) in (0, 1)
            async with http.get(f"{url}/things/2") as resp:  # the item the listing stored
                assert resp.headers["X-Cache"] == "HIT"
                assert max_age(resp.headers["Cache-Control"]) in (0, 1)
            await asyncio.sleep(1.2)
            async with http.get(f"{url}/things/2") as resp:
                assert resp.headers["X-Cache"] == "MISS"


@pytest.mark.parametrize("directive", ["no-store", "private"])
async def test_a_listing_holding_an_item_no_shared_cache_may_keep_is_never_public(
    http: aiohttp.ClientSession, directive: str
) -> None:
    async def batch(request: web.BaseRequest) -> web.StreamResponse:
        ids = request.query["ids"].split(",")
        return web.json_response(
            [{"id": int(i)} for i in ids], headers={"Cache-Control": directive}
        )

    async with UpstreamServer() as server:
        server.route("/a", batch)
        loaded = config.loads(LISTING.format(base=server.url), "gw.yaml", {})
        async with serving_config(loaded) as url:
            async with http.get(f"{url}/things?ids=1,2") as resp:
                assert resp.status == 200
                assert resp.headers["Cache-Control"] == "no-store"
            async with http.get(f"{url}/things?ids=1,2") as resp:
                assert resp.headers["X-Cache"] == "MISS"  # the items were never stored
