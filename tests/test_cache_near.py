"""The near tier in front of the real Redis: hits without a round trip, purges heard from other
instances, entries that never outlive their freshness, and a lost subscription that clears it."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

import pydantic
import pytest
import redis

from cache.composite import CompositeCache, open_cache
from cache.entry import Entry, Windows, decode, etag_of
from cache.near import NearCache, OnPurge
from cache.policy import CachePolicy, CacheSettings, NearSettings
from cache.redis import RedisStore, redis_store
from gateway.config.schema import CacheConfig, NearCacheConfig
from tests.redis_servers import stop
from tests.support import free_port, until

POLICY = CachePolicy(
    ttl_s=60,
    partial_ttl_s=5,
    stale_while_revalidate_s=300,
    stale_if_error_s=3600,
    not_found_ttl_s=10,
    allow_client_bypass=False,
)


class Clock:
    """A wall clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Upstream:
    """A compute that counts its calls and stamps entries with the test's clock."""

    def __init__(self, clock: Callable[[], float], status: int = 200, complete: bool = True):
        self.clock = clock
        self.status = status
        self.complete = complete
        self.calls = 0

    async def __call__(self) -> Entry:
        self.calls += 1
        body = b'{"n":%d}' % self.calls
        return Entry(self.status, body, self.complete, self.clock(), etag_of(body))


class Counting:
    """A `Store` that counts the calls it passes on to a real `RedisStore`."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    async def get(self, key: str) -> bytes | None:
        self.calls["get"] += 1
        return await self.inner.get(key)

    async def put(
        self, key: str, data: bytes, keep_s: float, tags: Sequence[str], unlock: str = ""
    ) -> None:
        self.calls["put"] += 1
        await self.inner.put(key, data, keep_s, tags, unlock)

    async def acquire(self, key: str, token: str, hold_s: float) -> tuple[bool, bytes | None]:
        self.calls["acquire"] += 1
        return await self.inner.acquire(key, token, hold_s)

    async def lookup(
        self, key: str, token: str, hold_s: float, windows: Windows, now: float
    ) -> tuple[bool, bytes | None]:
        self.calls["lookup"] += 1
        return await self.inner.lookup(key, token, hold_s, windows, now)

    async def release(self, key: str, token: str) -> bool:
        self.calls["release"] += 1
        return await self.inner.release(key, token)

    async def purge(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        self.calls["purge"] += 1
        return await self.inner.purge(keys, tags)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


def soon(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def subscribed(cache: CompositeCache) -> NearCache:
    """Return the cache's near tier once it hears purges."""
    near = cache.near
    assert near is not None
    near.start()
    await until(lambda: near.live)
    return near


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def instances(
    redis_url: str, redis_prefix: str, clock: Clock
) -> AsyncIterator[list[tuple[CompositeCache, Counting]]]:
    """Two caches with near tiers (10 s) on the real Redis, as two gateway processes would be,
    each store counting what reaches Redis."""
    made = []
    for _ in range(2):
        real = redis_store(redis_url, redis_prefix, 0.5)
        store = Counting(real)
        made.append(
            (CompositeCache(store, clock=clock, near=NearCache(100, 10, real.listen)), store)
        )
    yield made
    for cache, _ in made:
        await cache.close()


# --- the tier alone ---------------------------------------------------------------------------


def test_tier_holds_until_the_earlier_of_its_ttl_and_freshness_and_evicts_lru() -> None:
    near = NearCache(2, ttl_s=5)
    entry = Entry(200, b"{}", True, 100.0, etag_of(b"{}"))
    near.put("a", entry, now=100.0, fresh_until=103.0, tags=["t"], generation=0)
    near.put("b", entry, now=100.0, fresh_until=200.0, tags=[], generation=0)
    assert near.get("a", 102.9) is entry and near.get("a", 103.0) is None  # freshness first
    assert near.get("b", 104.9) is entry and near.get("b", 105.0) is None  # its own TTL first
    for key in "xyz":
        near.put(key, entry, 110.0, 200.0, [], near.generation)
    assert [k for k in "xyz" if near.get(k, 111.0)] == ["y", "z"]
    near.put("gone", entry, 110.0, 110.0, [], near.generation)
    assert near.get("gone", 110.0) is None  # no freshness left: not held at all


def test_a_read_from_before_a_purge_is_not_held_after_it() -> None:
    near = NearCache(10, ttl_s=5)
    entry = Entry(200, b"{}", True, 100.0, etag_of(b"{}"))
    near.put("k", entry, 100.0, 160.0, ["product:1"], near.generation)
    read_under = near.generation
    near.evict([], ["product:1"])
    assert near.get("k", 100.0) is None
    near.put("k", entry, 100.0, 160.0, ["product:1"], read_under)
    assert near.get("k", 100.0) is None


async def test_tier_with_a_channel_holds_nothing_until_subscribed() -> None:
    ready: list[Callable[[], None]] = []

    async def listen(on_purge: OnPurge, on_ready: Callable[[], None]) -> None:
        ready.append(on_ready)
        await asyncio.Event().wait()

    near = NearCache(10, ttl_s=5, listen=listen)
    entry = Entry(200, b"{}", True, 100.0, etag_of(b"{}"))
    near.put("k", entry, 100.0, 160.0, [], near.generation)
    assert len(near) == 0 and not near.live
    near.start()
    await until(lambda: bool(ready))
    ready[0]()
    near.put("k", entry, 100.0, 160.0, [], near.generation)
    assert near.get("k", 101.0) is entry
    await near.close()
    assert len(near) == 0


# --- in front of the real Redis ---------------------------------------------------------------


async def test_hot_key_is_served_from_the_near_tier_without_a_redis_call(
    instances: list[tuple[CompositeCache, Counting]], clock: Clock
) -> None:
    cache, store = instances[0]
    events: list[str] = []
    cache.on_event = events.append
    await subscribed(cache)
    compute = Upstream(clock)
    first = await cache.fetch("hot", ["product:1"], POLICY, compute, deadline=soon())
    assert first.state == "MISS"
    before = store.calls.copy()
    clock.now += 5  # within the tier's 10 s
    hits = [
        await cache.fetch("hot", ["product:1"], POLICY, compute, deadline=soon())
        for _ in range(100)
    ]
    assert store.calls == before  # not one get, acquire or put reached Redis
    assert compute.calls == 1 and events.count("hit") == 100
    assert {(h.state, h.entry.body, h.age_s, h.fresh_for_s) for h in hits} == {
        ("HIT", b'{"n":1}', 5.0, 55.0)
    }


async def test_a_hit_read_from_redis_is_held_for_the_next_request(
    instances: list[tuple[CompositeCache, Counting]], clock: Clock
) -> None:
    (writer, _), (reader, store) = instances
    compute = Upstream(clock)
    await writer.fetch("k", [], POLICY, compute, deadline=soon())
    await subscribed(reader)
    assert (await reader.fetch("k", [], POLICY, compute, deadline=soon())).state == "HIT"
    reads = store.calls["lookup"]
    assert (await reader.fetch("k", [], POLICY, compute, deadline=soon())).state == "HIT"
    assert store.calls["lookup"] == reads and compute.calls == 1


async def test_purge_through_one_instance_evicts_the_near_entries_of_another(
    instances: list[tuple[CompositeCache, Counting]], clock: Clock
) -> None:
    (one, _), (two, two_store) = instances
    near = await subscribed(two)
    await subscribed(one)
    compute = Upstream(clock)
    for key in ("p42", "p7"):
        await two.fetch(key, [f"product:{key[1:]}"], POLICY, compute, deadline=soon())
    assert len(near) == 2
    assert await one.purge(tags=["product:42"]) == 1
    await until(lambda: len(near) == 1, within_s=2)
    reads = two_store.calls["lookup"]
    assert (await two.fetch("p7", ["product:7"], POLICY, compute, deadline=soon())).state == "HIT"
    assert two_store.calls["lookup"] == reads  # the other key is still held
    again = await two.fetch("p42", ["product:42"], POLICY, compute, deadline=soon())
    assert (again.state, again.entry.body, compute.calls) == ("MISS", b'{"n":3}', 3)
    assert await one.purge(keys=["p7"]) == 1
    await until(lambda: near.get("p7", clock.now) is None, within_s=2)
    assert (await two.fetch("p7", ["product:7"], POLICY, compute, deadline=soon())).state == "MISS"


async def test_near_entries_expire_by_their_own_ttl(
    redis_url: str, redis_prefix: str, clock: Clock
) -> None:
    real = redis_store(redis_url, redis_prefix, 0.5)
    store = Counting(real)
    cache = CompositeCache(store, clock=clock, near=NearCache(100, 2, real.listen))
    await subscribed(cache)
    compute = Upstream(clock)
    await cache.fetch("k", [], POLICY, compute, deadline=soon())
    reads = store.calls["lookup"]
    clock.now += 1.9
    assert (await cache.fetch("k", [], POLICY, compute, deadline=soon())).state == "HIT"
    assert store.calls["lookup"] == reads
    clock.now += 0.2  # past the tier's 2 s, well within the entry's 60 s
    assert (await cache.fetch("k", [], POLICY, compute, deadline=soon())).state == "HIT"
    assert store.calls["lookup"] == reads + 1 and compute.calls == 1
    await cache.close()


@pytest.mark.parametrize(
    ("complete", "policy"),
    [(True, CachePolicy(2, 60, 300, 0, 10, False)), (False, CachePolicy(60, 2, 300, 0, 10, False))],
    ids=["complete", "partial"],
)
async def test_near_entries_never_outlive_freshness_and_stale_is_never_held(
    instances: list[tuple[CompositeCache, Counting]],
    clock: Clock,
    complete: bool,
    policy: CachePolicy,
) -> None:
    cache, store = instances[0]
    near = await subscribed(cache)  # its TTL is 10 s; the answer is fresh 2 s
    compute = Upstream(clock, complete=complete)
    await cache.fetch("k", [], policy, compute, deadline=soon())
    clock.now += 1.9
    reads = store.calls["lookup"]
    assert (await cache.fetch("k", [], policy, compute, deadline=soon())).state == "HIT"
    assert store.calls["lookup"] == reads
    clock.now += 0.2  # past freshness, long before the tier's 10 s
    compute.status = 502  # the background refresh fails: nothing new to hold
    stale = await cache.fetch("k", [], policy, compute, deadline=soon())
    assert (stale.state, stale.entry.body) == ("STALE", b'{"n":1}')
    assert store.calls["lookup"] == reads + 1
    await until(lambda: compute.calls == 2)
    assert len(near) == 0
    again = await cache.fetch("k", [], policy, compute, deadline=soon())
    assert again.state == "STALE" and store.calls["lookup"] == reads + 2


async def test_stale_if_error_answers_are_never_held(
    instances: list[tuple[CompositeCache, Counting]], clock: Clock
) -> None:
    cache, _ = instances[0]
    near = await subscribed(cache)
    policy = CachePolicy(2, 0, 0, 3600, 10, False)
    compute = Upstream(clock)
    await cache.fetch("k", [], policy, compute, deadline=soon())
    assert len(near) == 1
    clock.now += 3
    compute.status = 502
    answer = await cache.fetch("k", [], policy, compute, deadline=soon())
    assert (answer.state, answer.error_stale) == ("STALE", True)
    assert len(near) == 0


async def test_a_refreshed_or_bypassing_answer_replaces_the_held_one(
    instances: list[tuple[CompositeCache, Counting]], clock: Clock
) -> None:
    cache, _ = instances[0]
    near = await subscribed(cache)
    policy = CachePolicy(2, 0, 300, 0, 10, True)
    compute = Upstream(clock)
    await cache.fetch("k", [], policy, compute, deadline=soon())
    clock.now += 3
    assert (await cache.fetch("k", [], policy, compute, deadline=soon())).state == "STALE"
    await until(lambda: near.get("k", clock.now) is not None)
    held = await cache.fetch("k", [], policy, compute, deadline=soon())
    assert (held.state, held.entry.body) == ("HIT", b'{"n":2}')
    await cache.fetch("k", [], policy, compute, deadline=soon(), bypass=True)
    held = await cache.fetch("k", [], policy, compute, deadline=soon())
    assert (held.state, held.entry.body) == ("HIT", b'{"n":3}')


async def test_lost_subscription_clears_the_tier_and_it_resumes_when_redis_returns(
    throwaway: Callable[[int], subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    server = throwaway(port)
    cfg = CacheSettings(
        url=f"redis://127.0.0.1:{port}/0",
        op_timeout_s=0.2,
        near=NearSettings(max_entries=10, ttl_s=10),
    )
    cache = open_cache(cfg)
    near = await subscribed(cache)
    compute = Upstream(time.time)
    await cache.fetch("k", [], POLICY, compute, deadline=soon())
    assert len(near) == 1
    stop(server)
    await until(lambda: not near.live, within_s=3)
    assert len(near) == 0
    down = await cache.fetch("k", [], POLICY, compute, deadline=soon())
    assert (down.state, down.entry.status, len(near)) == ("MISS", 200, 0)
    throwaway(port)
    await until(lambda: near.live, within_s=5)  # resubscribed by itself
    assert (await cache.fetch("k", [], POLICY, compute, deadline=soon())).state == "MISS"
    assert (await cache.fetch("k", [], POLICY, compute, deadline=soon())).state == "HIT"
    assert len(near) == 1
    await cache.close()
    assert not near.live


async def test_purge_reaches_the_near_tier_of_another_instance_on_a_cluster(
    cluster_url: str,
) -> None:
    cfg = CacheSettings(
        url=cluster_url, key_prefix="near:", op_timeout_s=0.5, near=NearSettings(ttl_s=10)
    )
    one, two = open_cache(cfg), open_cache(cfg)
    near = await subscribed(two)
    compute = Upstream(time.time)
    keys = [f"k{i}" for i in range(10)]
    for key in keys:
        await two.fetch(key, ["product:1"], POLICY, compute, deadline=soon())
    assert len(near) == 10
    assert await one.purge(tags=["product:1"]) == 10
    await until(lambda: len(near) == 0, within_s=2)
    await one.close()
    await two.close()


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl_s", [0, -1, 10.5, 60])
def test_near_ttl_is_a_few_seconds_at_most(ttl_s: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="ttl_s"):
        NearCacheConfig(ttl_s=ttl_s)


def test_near_tier_needs_redis() -> None:
    with pytest.raises(pydantic.ValidationError, match="in front of Redis"):
        CacheConfig(url="memory://", near=NearCacheConfig())
    cfg = CacheConfig(url="redis://127.0.0.1:6379/0", near=NearCacheConfig(ttl_s=10))
    assert cfg.near is not None and cfg.near.max_entries == 1000


async def test_compress_min_bytes_reaches_the_stored_bytes(
    redis_url: str, redis_prefix: str, clock: Clock
) -> None:
    body = b'{"text":"' + b"abc" * 100 + b'"}'

    async def compute() -> Entry:
        return Entry(200, body, True, clock.now, etag_of(body))

    for threshold, compressed in ((64, True), (4096, False)):
        cache = open_cache(
            CacheSettings(url=redis_url, key_prefix=redis_prefix, compress_min_bytes=threshold)
        )
        await cache.fetch(f"k{threshold}", [], POLICY, compute, deadline=soon())
        raw = redis.Redis.from_url(redis_url)
        try:
            (stored_key,) = raw.keys(f"{redis_prefix}*:e")
            stored = raw.get(stored_key)
            raw.delete(stored_key)
        finally:
            raw.close()
        assert isinstance(stored, bytes) and decode(stored).body == body
        assert (len(stored) < len(body)) is compressed
        await cache.close()
