"""The Redis store against real servers: the shared one, throwaway ones that the tests stop,
slow down and restart, and a throwaway 3-node Redis Cluster."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis
from redis.crc import key_slot
from structlog.testing import capture_logs

from cache.composite import CompositeCache, open_cache
from cache.entry import Entry, make_entry
from cache.memory import MemoryStore
from cache.policy import CachePolicy, CacheSettings
from cache.redis import RedisStore, redis_store
from cache.store import CacheUnavailable, Store
from tests.redis_servers import stop
from tests.support import free_port

POLICY = CachePolicy(60, 5, 300, 3600, 10, True)


# --- computes ---------------------------------------------------------------------------------


class Counter:
    """A compute that counts its calls across every cache that runs it."""

    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.calls = 0
        self.delay = delay
        self.status = status

    async def __call__(self) -> Entry:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return make_entry(self.status, b'{"n":%d}' % self.calls, True)


def soon(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


@pytest.fixture
async def shared(redis_url: str, redis_prefix: str) -> AsyncIterator[list[CompositeCache]]:
    """Two caches on the real Redis, as two gateway processes would be."""
    caches = [CompositeCache(redis_store(redis_url, redis_prefix, 0.5)) for _ in range(2)]
    yield caches
    for cache in caches:
        await cache.close()


# --- locks ------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(100, 1 << 20)
        return
    made = redis_store(
        request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"), 0.5
    )
    yield made
    await made.close()


async def test_lock_is_released_only_by_its_owner(store: Store) -> None:
    assert (await store.acquire("k", "owner", 5))[0]
    assert not (await store.acquire("k", "other", 5))[0]
    assert not await store.release("k", "other")
    assert not (await store.acquire("k", "other", 5))[0]
    await store.put("k", b"v", 5, [], unlock="other")  # storing with a wrong token keeps the lock
    assert not (await store.acquire("k", "other", 5))[0]
    assert await store.release("k", "owner")
    assert not await store.release("k", "owner")
    assert (await store.acquire("k", "other", 5))[0]
    await store.put("k", b"v", 5, [], unlock="other")
    assert (await store.acquire("k", "third", 5))[0]


async def test_lock_is_taken_again_by_the_token_that_holds_it(store: Store) -> None:
    # An acquire that timed out on the caller's side may have taken the lock: its next poll
    # must get it, not wait for itself.
    assert (await store.acquire("k", "owner", 5))[0]
    assert (await store.acquire("k", "owner", 5))[0]
    assert not (await store.acquire("k", "other", 5))[0]
    assert await store.release("k", "owner")


async def test_lock_expires_by_itself(store: Store) -> None:
    assert (await store.acquire("k", "owner", 0.05))[0]
    await asyncio.sleep(0.15)
    assert (await store.acquire("k", "other", 5))[0]
    assert not await store.release("k", "owner")


# --- across processes -------------------------------------------------------------------------


async def test_single_flight_across_two_instances_computes_once(
    shared: list[CompositeCache],
) -> None:
    compute = Counter(delay=0.15)
    results = await asyncio.gather(
        *(shared[i % 2].fetch("k", ["t"], POLICY, compute, deadline=soon()) for i in range(200))
    )
    assert compute.calls == 1
    assert {r.entry.body for r in results} == {b'{"n":1}'}
    assert {r.state for r in results} == {"MISS"}


async def test_follower_computes_itself_when_the_leader_stores_nothing(
    shared: list[CompositeCache],
) -> None:
    failing = Counter(delay=0.1, status=502)
    one, two = shared
    leader = asyncio.create_task(one.fetch("k", [], POLICY, failing, deadline=soon()))
    await asyncio.sleep(0.03)
    ok = Counter()
    started = time.monotonic()
    follower = await two.fetch("k", [], POLICY, ok, deadline=soon())
    assert (await leader).entry.status == 502
    assert (follower.entry.status, ok.calls) == (200, 1)
    assert time.monotonic() - started < 1.0  # the lock's release let it lead, no deadline wait


async def test_a_follower_in_another_process_computes_itself_when_the_leader_hits_a_bug(
    shared: list[CompositeCache],
) -> None:
    one, two = shared

    async def exploding() -> Entry:
        await asyncio.sleep(0.1)
        raise RuntimeError("a bug in the leader's own request")

    leader = asyncio.create_task(one.fetch("k", [], POLICY, exploding, deadline=soon()))
    await asyncio.sleep(0.03)
    ok = Counter()
    started = time.monotonic()
    follower = await two.fetch("k", [], POLICY, ok, deadline=soon())
    with pytest.raises(RuntimeError):
        await leader
    assert (follower.entry.status, ok.calls) == (200, 1)
    assert time.monotonic() - started < 1.0  # the lock's release let it lead, no deadline wait


async def test_stale_while_revalidate_refreshes_once_across_instances(
    redis_url: str, redis_prefix: str
) -> None:
    clock = [time.time()]
    caches = [
        CompositeCache(redis_store(redis_url, redis_prefix, 0.5), clock=lambda: clock[0])
        for _ in range(2)
    ]
    compute = Counter(delay=0.2)
    await caches[0].fetch("k", [], POLICY, compute, deadline=soon())
    clock[0] += 61
    results = await asyncio.gather(
        *(caches[i % 2].fetch("k", [], POLICY, compute, deadline=soon()) for i in range(50))
    )
    assert {r.state for r in results} == {"STALE"}
    await asyncio.sleep(0.5)
    assert compute.calls == 2
    for cache in caches:
        await cache.close()


async def test_tag_sets_expire_with_their_longest_entry(redis_url: str, redis_prefix: str) -> None:
    store = redis_store(redis_url, redis_prefix, 0.5)
    await store.put("long", b"x", 100, ["t"])
    await store.put("short", b"x", 10, ["t"])
    client = redis.Redis.from_url(redis_url)
    try:
        (tag_key,) = client.keys(f"{redis_prefix}*:t")
        assert 99_000 < client.pttl(tag_key) <= 100_000
        assert client.smembers(tag_key) == {b"long", b"short"}
    finally:
        client.close()
        await store.close()


async def test_a_value_is_read_no_further_than_one_byte_past_the_limit(
    redis_url: str, redis_prefix: str
) -> None:
    store = redis_store(redis_url, redis_prefix, 0.5, max_value_bytes=1000)
    await store.put("long", b"x" * 5000, 60, [])
    await store.put("short", b"y" * 10, 60, [])
    assert await store.get("long") == b"x" * 1001  # one byte more says it is longer
    assert (await store.acquire("long", "t", 5))[1] == b"x" * 1001
    assert await store.get("short") == b"y" * 10
    assert (await store.acquire("short", "t", 5))[1] == b"y" * 10
    assert await store.get("none") is None
    assert await store.acquire("none", "t", 5) == (True, None)
    await store.close()


def test_an_entry_and_its_lock_share_a_slot_and_braces_in_keys_do_not_move_it() -> None:
    store = RedisStore(redis.asyncio.Redis(), "gw:", 0.02)
    for key in ["gw:/products/%7Bid%7D:d:id=1", "a{b}c", "{", "}x{"]:
        assert key_slot(store._entry(key).encode()) == key_slot(store._lock(key).encode())
    with pytest.raises(ValueError, match="braces"):
        RedisStore(redis.asyncio.Redis(), "gw{x}:", 0.02)


# --- a Redis that is down, slow, or restarted -------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_redis_down_means_uncached_answers_and_a_failing_ping(scheme: str) -> None:
    cache = open_cache(CacheSettings(url=f"{scheme}://127.0.0.1:{free_port()}"))
    events: list[str] = []
    cache.on_event = events.append
    compute = Counter()
    slowest = 0.0
    with capture_logs() as logs:
        for _ in range(30):
            started = time.monotonic()
            lookup = await cache.fetch("k", ["t"], POLICY, compute, deadline=soon())
            slowest = max(slowest, time.monotonic() - started)
            assert (lookup.state, lookup.entry.status) == ("MISS", 200)
    assert compute.calls == 30
    assert slowest < 0.25
    assert "error" in events
    assert [e["event"] for e in logs] == ["cache_unavailable"]  # rate-limited, not 90 lines
    with pytest.raises(CacheUnavailable):
        await cache.ping()
    with pytest.raises(CacheUnavailable):
        await cache.purge(tags=["t"])
    await cache.close()


async def test_slow_redis_costs_at_most_the_op_timeout_and_leaves_no_wrong_replies(
    throwaway: Callable[[int], subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    throwaway(port)
    url = f"redis://127.0.0.1:{port}/0"
    cache = open_cache(CacheSettings(url=url, op_timeout_s=0.02))
    store = redis_store(url, "gw:", 1.0)
    for i in range(20):
        await store.put(f"k{i}", b"v%d" % i, 60, [])
    # Every connection of the cache's pool is busy when the server stalls.
    for i in range(20):
        await cache.store.get(f"k{i}")
    admin = redis.asyncio.Redis(port=port)
    stall = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "0.6"))
    await asyncio.sleep(0.05)
    compute = Counter()
    started = time.monotonic()
    answers = await asyncio.gather(
        *(cache.fetch(f"new{i}", [], POLICY, compute, deadline=soon()) for i in range(20))
    )
    assert time.monotonic() - started < 0.4
    assert {a.entry.status for a in answers} == {200} and compute.calls == 20
    await stall
    # Replies to the timed-out commands must never be read as answers to later ones. A read may
    # still time out while connections are re-made; a wrong value never comes back.
    right = [b"v%d" % i for i in range(20)]
    rounds_all_right = 0
    for _ in range(50):
        values = await asyncio.gather(
            *(cache.store.get(f"k{i}") for i in range(20)), return_exceptions=True
        )
        assert all(
            v == r or isinstance(v, CacheUnavailable) for v, r in zip(values, right, strict=True)
        )
        rounds_all_right += values == right
        if rounds_all_right == 5:
            break
    assert rounds_all_right == 5
    await admin.aclose()
    await store.close()
    await cache.close()


async def test_killed_and_restarted_redis_keeps_answering_and_caching_resumes(
    throwaway: Callable[[int], subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    server = throwaway(port)
    cache = open_cache(CacheSettings(url=f"redis://127.0.0.1:{port}/0", op_timeout_s=0.02))
    compute = Counter()
    latencies: dict[str, list[float]] = {"up": [], "down": [], "back": []}

    async def ask(phase: str) -> str:
        started = time.monotonic()
        lookup = await cache.fetch("k", [], POLICY, compute, deadline=soon())
        latencies[phase].append(time.monotonic() - started)
        assert lookup.entry.status == 200
        return lookup.state

    assert await ask("up") == "MISS"
    assert await ask("up") == "HIT"
    stop(server)
    for _ in range(40):
        assert await ask("down") == "MISS"
        await asyncio.sleep(0.005)
    throwaway(port)
    states = []
    until = time.monotonic() + 5
    while time.monotonic() < until and states[-2:] != ["MISS", "HIT"]:
        states.append(await ask("back"))
        await asyncio.sleep(0.01)
    assert states[-2:] == ["MISS", "HIT"], states
    assert max(latencies["down"]) < 0.25, latencies["down"]
    await cache.ping()
    await cache.close()


class Leaky:
    """A client that fails as redis-py's cluster client was seen to while re-discovering its
    nodes after one died: with whatever its internals raise, not a `RedisError`."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def getrange(self, *args: object) -> bytes:
        raise self.exc

    async def eval(self, *args: object) -> object:
        raise self.exc

    async def execute_command(self, *args: object) -> object:
        raise self.exc

    def register_script(self, script: str) -> LeakyScript:
        return LeakyScript(self.exc, script)

    async def smembers(self, *args: object) -> object:
        raise self.exc

    async def ping(self) -> bool:
        raise self.exc

    def pipeline(self, transaction: bool) -> object:
        raise self.exc

    async def aclose(self) -> None:
        if isinstance(self.exc, Exception):
            raise self.exc


class LeakyScript:
    """A registered script of a `Leaky` client: called, it fails as its client does."""

    sha = "0" * 40

    def __init__(self, exc: BaseException, script: str) -> None:
        self.exc = exc
        self.script = script

    async def __call__(self, *args: object, **kwargs: object) -> object:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("unable to perform operation on <TCPTransport closed=True>"),
        AttributeError("'NoneType' object has no attribute 'writelines'"),
        asyncio.CancelledError(),
    ],
    ids=["closed-transport", "none-writer", "inner-cancel"],
)
async def test_whatever_the_client_raises_is_a_cache_failure_never_an_error(
    exc: BaseException,
) -> None:
    store = RedisStore(Leaky(exc), "gw:", 0.5)  # type: ignore[arg-type]
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("k"),
        lambda: store.put("k", b"v", 5, ["t"]),
        lambda: store.acquire("k", "t", 5),
        lambda: store.release("k", "t"),
        lambda: store.purge(["k"], ["t"]),
        store.ping,
    ]
    with capture_logs() as logs:
        for operation in operations:
            with pytest.raises(CacheUnavailable):
                await operation()
        cache = CompositeCache(store)
        compute = Counter()
        for _ in range(3):
            lookup = await cache.fetch("k", ["t"], POLICY, compute, deadline=soon())
            assert (lookup.state, lookup.entry.status) == ("MISS", 200)
        await cache.close()  # closing such a client does not raise either
    leaks = [e for e in logs if e["event"] == "redis_client_raised"]
    assert len(leaks) == (0 if isinstance(exc, asyncio.CancelledError) else 1)  # rate-limited


# --- Redis Cluster ----------------------------------------------------------------------------


@pytest.fixture
async def on_cluster(cluster_url: str) -> AsyncIterator[list[CompositeCache]]:
    """Two caches on the throwaway cluster, each with its own key prefix per test."""
    prefix = f"t{random.randrange(1 << 30)}:"
    caches = [
        open_cache(CacheSettings(url=cluster_url, key_prefix=prefix, op_timeout_s=0.5))
        for _ in range(2)
    ]
    yield caches
    for cache in caches:
        await cache.close()


async def test_cluster_hit_miss_and_ping(on_cluster: list[CompositeCache]) -> None:
    cache = on_cluster[0]
    await cache.ping()
    compute = Counter()
    keys = [f"gw:/products/{i}:d:id={i}" for i in range(30)]
    store = cache.store
    assert isinstance(store, RedisStore)
    assert len({key_slot(store._entry(k).encode()) * 3 // 16384 for k in keys}) == 3  # all nodes
    for key in keys:
        assert (await cache.fetch(key, [], POLICY, compute, deadline=soon())).state == "MISS"
    for key in keys:
        assert (await on_cluster[1].fetch(key, [], POLICY, compute, deadline=soon())).state == "HIT"
    assert compute.calls == 30


async def test_cluster_purge_by_tag_reaches_keys_on_every_node(
    on_cluster: list[CompositeCache],
) -> None:
    one, two = on_cluster
    compute = Counter()
    keys = [f"k{i}" for i in range(30)]
    for i, key in enumerate(keys):
        await one.fetch(
            key, ["product:42" if i % 2 else "product:7", "all"], POLICY, compute, deadline=soon()
        )
    assert await two.purge(tags=["product:42"]) == 15
    assert await two.purge(keys=["k0", "k2"]) == 2
    states = [(await one.fetch(k, [], POLICY, compute, deadline=soon())).state for k in keys]
    assert states.count("MISS") == 17
    assert await two.purge(tags=["all"]) == 30  # the misses above were stored again


async def test_cluster_single_flight_across_instances(on_cluster: list[CompositeCache]) -> None:
    compute = Counter(delay=0.15)
    results = await asyncio.gather(
        *(
            on_cluster[i % 2].fetch("hot", ["t"], POLICY, compute, deadline=soon())
            for i in range(200)
        )
    )
    assert compute.calls == 1
    assert {r.entry.body for r in results} == {b'{"n":1}'}


async def test_cluster_cold_client_with_the_default_op_timeout_starts_caching(
    cluster_url: str,
) -> None:
    cache = open_cache(CacheSettings(url=cluster_url, key_prefix=f"c{random.randrange(1 << 30)}:"))
    compute = Counter()
    states: list[set[str]] = []
    until = time.monotonic() + 10
    while time.monotonic() < until and states[-1:] != [{"HIT"}]:
        burst = await asyncio.gather(
            *(cache.fetch(f"k{i}", [], POLICY, compute, deadline=soon(1)) for i in range(20))
        )
        states.append({b.state for b in burst})
    assert states[-1] == {"HIT"}, states
    await cache.close()
