"""The in-process store: expiry, LRU bounds by entries and bytes, tags, and `open_cache`."""

from __future__ import annotations

import asyncio

from cache.composite import CompositeCache, open_cache
from cache.entry import Entry, make_entry
from cache.memory import MemoryStore
from cache.policy import CachePolicy, CacheSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_entries_expire_by_the_clock() -> None:
    clock = Clock()
    store = MemoryStore(10, 1000, clock=clock)
    await store.put("k", b"v", 5, ["t"])
    clock.now += 4.9
    assert await store.get("k") == b"v"
    clock.now += 0.2
    assert await store.get("k") is None
    assert store.size == (0, 0)
    assert await store.purge([], ["t"]) == 0


async def test_least_recently_used_entry_goes_first_past_max_entries() -> None:
    store = MemoryStore(3, 1000)
    for key in "abc":
        await store.put(key, b"v", 60, [])
    assert await store.get("a") == b"v"  # "b" is now the least recently used
    await store.put("d", b"v", 60, [])
    assert [await store.get(k) for k in "abcd"] == [b"v", None, b"v", b"v"]
    assert store.size == (3, 3)


async def test_bytes_bound_evicts_until_it_fits_and_skips_oversized_values() -> None:
    store = MemoryStore(100, 10)
    await store.put("a", b"1234", 60, ["t"])
    await store.put("b", b"1234", 60, ["t"])
    await store.put("c", b"1234", 60, ["t"])
    assert await store.get("a") is None
    assert store.size == (2, 8)
    await store.put("huge", b"x" * 11, 60, ["t"])
    assert await store.get("huge") is None
    assert store.size == (2, 8)
    assert await store.purge([], ["t"]) == 2
    assert store.size == (0, 0)


async def test_overwriting_a_key_keeps_the_byte_count_right() -> None:
    store = MemoryStore(10, 100)
    await store.put("a", b"12345", 60, ["t1"])
    await store.put("a", b"12", 60, ["t2"])
    assert store.size == (1, 2)
    assert await store.purge([], ["t1"]) == 0  # "a" left t1 when it was written with t2 only
    assert await store.purge([], ["t2"]) == 1


async def test_put_releases_only_the_holders_lock() -> None:
    store = MemoryStore(10, 100)
    assert await store.acquire("k", "me", 5) == (True, None)
    await store.put("k", b"v", 60, [], unlock="you")
    assert await store.acquire("k", "you", 5) == (False, b"v")
    await store.put("k", b"w", 60, [], unlock="me")
    assert await store.acquire("k", "you", 5) == (True, b"w")


async def test_open_cache_memory_url_bounds_the_store_from_config() -> None:
    cache = open_cache(CacheSettings(url="memory://", memory_max_entries=2))
    assert isinstance(cache.store, MemoryStore)
    policy = CachePolicy(60, 0, 0, 0, 10, False)

    async def compute() -> Entry:
        return make_entry(200, b"{}", True)

    deadline = asyncio.get_running_loop().time() + 1
    for key in "abc":
        await cache.fetch(key, [], policy, compute, deadline=deadline)
    assert cache.store.size[0] == 2
    await cache.ping()
    await cache.close()


async def test_corrupt_stored_bytes_are_a_miss_and_an_error_event() -> None:
    store = MemoryStore(10, 1000)
    cache = CompositeCache(store)
    events: list[str] = []
    cache.on_event = events.append
    await store.put("k", b"not an entry", 60, [])
    policy = CachePolicy(60, 0, 0, 0, 10, False)

    async def compute() -> Entry:
        return make_entry(200, b"{}", True)

    deadline = asyncio.get_running_loop().time() + 1
    lookup = await cache.fetch("k", [], policy, compute, deadline=deadline)
    assert lookup.state == "MISS"
    assert events[0] == "error"
    assert (await cache.fetch("k", [], policy, compute, deadline=deadline)).state == "HIT"
