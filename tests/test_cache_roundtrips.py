"""What the cache costs the real Redis per request, counted by the server (`INFO commandstats` of
a Redis of the test's own): one command before a miss's fan-out, one round trip after it, one
command per hit, none where nothing can be stored; scripts by SHA, reloaded after a flush."""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis, RedisCluster

from cache.composite import CompositeCache
from cache.entry import Entry, make_entry
from cache.policy import CachePolicy
from cache.redis import redis_store
from tests.support import free_port

POLICY = CachePolicy(60, 5, 300, 3600, 10, False)
NEVER_STORED = CachePolicy(0, 0, 300, 3600, 0, False)


async def commands(probe: Redis) -> Counter[str]:
    """Return how many times the server ran each command (INFO itself left out)."""
    stats = await probe.info("commandstats")
    counts = Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})
    del counts["info"]
    return counts


@pytest.fixture
async def server(
    throwaway: Callable[[int], subprocess.Popen[bytes]],
) -> AsyncIterator[tuple[CompositeCache, Redis]]:
    """A cache on a Redis nobody else talks to, and a probe connection to count its commands."""
    port = free_port()
    throwaway(port)
    url = f"redis://127.0.0.1:{port}/0"
    cache = CompositeCache(redis_store(url, "rt:", 1.0))
    probe = Redis.from_url(url)
    yield cache, probe
    await probe.aclose()
    await cache.close()


class Counted:
    """A compute function that notes the commands the server ran before the fan-out began."""

    def __init__(self, probe: Redis, base: Counter[str]) -> None:
        self.probe = probe
        self.base = base
        self.before: Counter[str] | None = None
        self.calls = 0

    async def __call__(self) -> Entry:
        self.calls += 1
        self.before = await commands(self.probe) - self.base
        return make_entry(200, b'{"n":%d}' % self.calls, True)


def soon() -> float:
    return asyncio.get_running_loop().time() + 5.0


@pytest.mark.parametrize("tags", [[], ["product:1", "product:2"]], ids=["untagged", "tagged"])
async def test_a_miss_sends_one_command_before_its_fan_out_and_a_hit_one_in_all(
    server: tuple[CompositeCache, Redis], tags: list[str]
) -> None:
    cache, probe = server
    # Loads the scripts; its own tag set, so that each measured tag set is new (and expired).
    warm_tags = ["warm"] if tags else []
    await cache.fetch("warm", warm_tags, POLICY, Counted(probe, Counter()), deadline=soon())
    base = await commands(probe)
    compute = Counted(probe, base)
    miss = await cache.fetch("k", tags, POLICY, compute, deadline=soon())
    assert miss.state == "MISS" and compute.calls == 1
    # The commands the client sent are the EVALSHAs; the rest ran inside those scripts.
    # Before the fan-out: the lookup and the lock, one script called by its SHA.
    assert compute.before == Counter({"evalsha": 1, "getrange": 1, "set": 1})
    # After it: the entry stored and the lock released in one script, each tag set in one more,
    # all sent as one pipeline.
    per_tag = Counter({"evalsha": 1, "sadd": 1, "pttl": 1, "pexpire": 1})
    stored = Counter({"evalsha": 2, "getrange": 1, "set": 2, "get": 1, "del": 1})
    for _ in tags:
        stored += per_tag
    assert await commands(probe) - base == stored
    base = await commands(probe)
    hit = await cache.fetch("k", tags, POLICY, compute, deadline=soon())
    assert (hit.state, hit.entry.body, compute.calls) == ("HIT", b'{"n":1}', 1)
    assert await commands(probe) - base == Counter({"evalsha": 1, "getrange": 1})


async def test_an_endpoint_that_never_stores_never_talks_to_redis(
    server: tuple[CompositeCache, Redis],
) -> None:
    cache, probe = server
    base = await commands(probe)
    compute = Counted(probe, base)
    for _ in range(3):
        answer = await cache.fetch("k", ["product:1"], NEVER_STORED, compute, deadline=soon())
        assert answer.state == "BYPASS"
    assert compute.calls == 3
    assert await commands(probe) - base == Counter()


async def test_scripts_flushed_from_the_server_are_loaded_again(
    server: tuple[CompositeCache, Redis],
) -> None:
    cache, probe = server
    compute = Counted(probe, Counter())
    await cache.fetch("warm", ["product:1"], POLICY, compute, deadline=soon())
    await probe.script_flush()
    events: list[str] = []
    cache.on_event = events.append
    for key in ("a", "a"):
        await cache.fetch(key, ["product:1"], POLICY, compute, deadline=soon())
    assert (events, compute.calls) == (["miss", "hit"], 2)
    assert (await commands(probe))["script|load"] >= 2


async def test_scripts_flushed_from_a_cluster_are_loaded_again(cluster_url: str) -> None:
    cache = CompositeCache(redis_store(cluster_url, f"rt{free_port()}:", 1.0))
    nodes = RedisCluster.from_url(cluster_url.replace("redis+cluster://", "redis://"))
    calls = 0

    async def fanout() -> Entry:
        nonlocal calls
        calls += 1
        return make_entry(200, b'{"n":%d}' % calls, True)

    try:
        await cache.fetch("warm", ["product:1"], POLICY, fanout, deadline=soon())
        await nodes.script_flush()  # on every primary
        events: list[str] = []
        cache.on_event = events.append
        for key in ("a", "a"):
            await cache.fetch(key, ["product:1", "product:2"], POLICY, fanout, deadline=soon())
        assert (events, calls) == (["miss", "hit"], 2)
    finally:
        await nodes.aclose()
        await cache.close()
