"""The cache policy, the same on both backends: TTLs by outcome, SWR, stale-if-error,
single-flight, bypass and purge. Time is a clock the test moves; Redis is the real one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from cache.composite import CompositeCache
from cache.entry import Entry, Windows, encode, etag_of
from cache.memory import MemoryStore
from cache.policy import CachePolicy
from cache.redis import redis_store
from cache.store import CacheUnavailable, Store
from gateway.config.schema import EndpointCache
from gateway.core.plan import cache_policy

POLICY = CachePolicy(
    ttl_s=60,
    partial_ttl_s=5,
    stale_while_revalidate_s=300,
    stale_if_error_s=3600,
    not_found_ttl_s=10,
    allow_client_bypass=True,
)
PLAIN = CachePolicy(60, 0, 0, 0, 10, False)


class Clock:
    """A wall clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Upstream:
    """A compute function that counts its calls and answers what the test scripts."""

    clock: Clock
    status: int = 200
    complete: bool = True
    delay: float = 0.0
    raises: BaseException | None = None
    calls: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self) -> Entry:
        self.calls += 1
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.raises is not None:
            raise self.raises
        body = b'{"n":%d}' % self.calls
        return Entry(self.status, body, self.complete, self.clock(), etag_of(body))


StoreFactory = Callable[[], Store]


@pytest.fixture(params=["memory", "redis"])
async def new_store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[StoreFactory]:
    """Make stores that share one backend: one process's memory, or the real Redis."""
    made: list[Store] = []
    memory = MemoryStore(1000, 1 << 24, clock=clock)

    def make() -> Store:
        if request.param == "memory":
            return memory
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        store = redis_store(url, prefix, op_timeout_s=0.5)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(new_store: StoreFactory, clock: Clock) -> CompositeCache:
    return CompositeCache(new_store(), clock=clock)


def far() -> float:
    return asyncio.get_running_loop().time() + 5.0


async def fetch(
    cache: CompositeCache,
    compute: Callable[[], Awaitable[Entry]],
    policy: CachePolicy = POLICY,
    key: str = "k",
    **kw: object,
) -> tuple[str, int, bytes]:
    lookup = await cache.fetch(key, ["product:1"], policy, compute, deadline=far(), **kw)  # type: ignore[arg-type]
    return lookup.state, lookup.entry.status, lookup.entry.body


def test_policy_of_a_cache_block_takes_every_field() -> None:
    cfg = EndpointCache(
        ttl_s=60,
        partial_ttl_s=5,
        stale_while_revalidate_s=300,
        stale_if_error_s=3600,
        not_found_ttl_s=7,
        allow_client_bypass=True,
        tags=("product:{id}",),
    )
    assert cache_policy(cfg) == CachePolicy(60, 5, 300, 3600, 7, True)


async def test_miss_then_hit_until_ttl(cache: CompositeCache, clock: Clock) -> None:
    up = Upstream(clock)
    assert await fetch(cache, up, PLAIN) == ("MISS", 200, b'{"n":1}')
    clock.now += 59
    first = await cache.fetch("k", [], PLAIN, up, deadline=far())
    assert (first.state, first.entry.body, first.age_s, first.fresh_for_s) == (
        "HIT",
        b'{"n":1}',
        59,
        1,
    )
    clock.now += 1.5
    assert await fetch(cache, up, PLAIN) == ("MISS", 200, b'{"n":2}')
    assert up.calls == 2


async def test_a_fresh_hit_from_memory_takes_no_lock_and_no_flight(clock: Clock) -> None:
    store = MemoryStore(1000, 1 << 24, clock=clock)
    cache = CompositeCache(store, clock=clock)
    up = Upstream(clock)
    assert await fetch(cache, up, PLAIN) == ("MISS", 200, b'{"n":1}')
    looked: list[str] = []
    lookup = store.lookup

    async def counted(key: str, *args: Any) -> tuple[bool, bytes | None]:
        looked.append(key)
        return await lookup(key, *args)

    store.lookup = counted  # type: ignore[method-assign]
    hits = [cache.fetch("k", [], PLAIN, up, deadline=far()) for _ in range(3)]
    assert [h.state for h in await asyncio.gather(*hits)] == ["HIT"] * 3
    assert looked == [] and store._locks == {} and up.calls == 1
    clock.now += 61  # past the TTL, the whole way: one lookup that takes the lock
    assert await fetch(cache, up, PLAIN) == ("MISS", 200, b'{"n":2}')
    assert looked == ["k"]


async def test_miss_reports_full_freshness_and_hit_keeps_etag(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock)
    miss = await cache.fetch("k", [], POLICY, up, deadline=far())
    assert (miss.state, miss.age_s, miss.fresh_for_s, miss.error_stale) == ("MISS", 0, 60, False)
    hit = await cache.fetch("k", [], POLICY, up, deadline=far())
    assert hit.entry == miss.entry


async def test_partial_answers_live_partial_ttl(cache: CompositeCache, clock: Clock) -> None:
    up = Upstream(clock, complete=False)
    assert (await fetch(cache, up))[0] == "MISS"
    clock.now += 4
    assert (await fetch(cache, up))[0] == "HIT"
    clock.now += 2
    assert (await fetch(cache, up, PLAIN))[0] == "MISS"  # past partial_ttl_s, no SWR: a miss


async def test_partial_answers_are_not_stored_when_partial_ttl_is_zero(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock, complete=False)
    lookup = await cache.fetch("k", [], PLAIN, up, deadline=far())
    assert (lookup.state, lookup.fresh_for_s) == ("MISS", 0)
    assert (await fetch(cache, up, PLAIN))[0] == "MISS"
    assert up.calls == 2


async def test_not_found_is_cached_for_not_found_ttl(cache: CompositeCache, clock: Clock) -> None:
    up = Upstream(clock, status=404)
    assert await fetch(cache, up, PLAIN) == ("MISS", 404, b'{"n":1}')
    clock.now += 9
    assert await fetch(cache, up, PLAIN) == ("HIT", 404, b'{"n":1}')
    clock.now += 2
    assert await fetch(cache, up, PLAIN) == ("MISS", 404, b'{"n":2}')


async def test_not_found_is_never_served_stale(cache: CompositeCache, clock: Clock) -> None:
    # POLICY has wide stale windows (300 s, 3600 s): none of them applies to a 404.
    up = Upstream(clock, status=404)
    assert await fetch(cache, up) == ("MISS", 404, b'{"n":1}')
    clock.now += 11
    assert await fetch(cache, up) == ("MISS", 404, b'{"n":2}')  # recomputed, not revalidated
    clock.now += 11
    up.status = 502
    assert await fetch(cache, up) == ("MISS", 502, b'{"n":3}')  # the error, not the old 404
    up.raises = TimeoutError()
    with pytest.raises(TimeoutError):
        await fetch(cache, up)


def test_not_found_is_kept_only_for_not_found_ttl() -> None:
    body = b'{"error":{}}'
    assert POLICY.keep_for(Entry(404, body, False, 0.0, etag_of(body))) == 10
    assert POLICY.keep_for(Entry(200, body, True, 0.0, etag_of(body))) == 60 + 3600


async def test_answers_longer_than_max_body_bytes_are_served_but_not_stored(
    new_store: StoreFactory, clock: Clock
) -> None:
    cache = CompositeCache(new_store(), clock=clock, max_body_bytes=7)
    up = Upstream(clock)  # its bodies, b'{"n":1}', are 7 bytes long
    assert await fetch(cache, up) == ("MISS", 200, b'{"n":1}')
    assert await fetch(cache, up) == ("HIT", 200, b'{"n":1}')
    cache = CompositeCache(new_store(), clock=clock, max_body_bytes=6)
    assert await fetch(cache, up, key="other") == ("MISS", 200, b'{"n":2}')
    assert await fetch(cache, up, key="other") == ("MISS", 200, b'{"n":3}')
    assert await fetch(cache, up) == ("MISS", 200, b'{"n":4}')  # k's 7 bytes: read as corrupt


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_server_errors_are_never_stored(
    cache: CompositeCache, clock: Clock, status: int
) -> None:
    up = Upstream(clock, status=status)
    lookup = await cache.fetch("k", [], POLICY, up, deadline=far())
    assert (lookup.state, lookup.entry.status, lookup.fresh_for_s) == ("MISS", status, 0)
    assert await fetch(cache, up) == ("MISS", status, b'{"n":2}')


async def test_stale_is_served_at_once_while_one_refresh_runs(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock)
    await fetch(cache, up)
    clock.now += 61
    up.delay = 1.0
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(*(fetch(cache, up) for _ in range(50)))
    assert asyncio.get_running_loop().time() - started < 0.6  # not waiting for the refresh
    assert set(results) == {("STALE", 200, b'{"n":1}')}
    await asyncio.sleep(1.2)
    assert up.calls == 2  # the first fill and exactly one refresh
    assert await fetch(cache, up) == ("HIT", 200, b'{"n":2}')


async def test_stale_lookup_reports_age_and_no_freshness(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock)
    await fetch(cache, up)
    clock.now += 100
    lookup = await cache.fetch("k", [], POLICY, up, deadline=far())
    assert (lookup.state, lookup.age_s, lookup.fresh_for_s, lookup.error_stale) == (
        "STALE",
        100,
        0,
        False,
    )
    await asyncio.sleep(0.05)


@pytest.mark.parametrize("failure", ["status", "timeout"])
async def test_failed_refresh_keeps_the_stale_copy(
    cache: CompositeCache, clock: Clock, failure: str
) -> None:
    up = Upstream(clock)
    await fetch(cache, up)
    clock.now += 61
    if failure == "status":
        up.status = 502
    else:
        up.raises = TimeoutError()
    assert await fetch(cache, up) == ("STALE", 200, b'{"n":1}')
    await asyncio.sleep(0.05)
    assert await fetch(cache, up) == ("STALE", 200, b'{"n":1}')
    await asyncio.sleep(0.05)
    assert up.calls == 3  # each stale read after a failed refresh may try again, one at a time


async def test_past_swr_window_is_a_miss(cache: CompositeCache, clock: Clock) -> None:
    policy = CachePolicy(60, 0, 30, 0, 10, False)
    up = Upstream(clock)
    await fetch(cache, up, policy)
    clock.now += 91
    assert await fetch(cache, up, policy) == ("MISS", 200, b'{"n":2}')


@pytest.mark.parametrize("failure", ["status", "timeout"])
async def test_stale_if_error_serves_the_old_copy(
    cache: CompositeCache, clock: Clock, failure: str
) -> None:
    policy = CachePolicy(60, 0, 0, 600, 10, False)
    up = Upstream(clock)
    await fetch(cache, up, policy)
    clock.now += 500
    if failure == "status":
        up.status = 504
    else:
        up.raises = TimeoutError()
    lookup = await cache.fetch("k", [], policy, up, deadline=far())
    assert (lookup.state, lookup.error_stale, lookup.entry.body) == ("STALE", True, b'{"n":1}')
    assert (lookup.age_s, lookup.fresh_for_s) == (500, 0)


async def test_stale_if_error_has_a_limit(cache: CompositeCache, clock: Clock) -> None:
    policy = CachePolicy(60, 0, 0, 600, 10, False)
    up = Upstream(clock)
    await fetch(cache, up, policy)
    clock.now += 661
    up.status = 502
    assert await fetch(cache, up, policy) == ("MISS", 502, b'{"n":2}')
    up.raises = TimeoutError()
    with pytest.raises(TimeoutError):
        await fetch(cache, up, policy)


async def test_single_flight_runs_one_compute_for_200_cold_fetches(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock, delay=0.1)
    results = await asyncio.gather(*(fetch(cache, up) for _ in range(200)))
    assert up.calls == 1
    assert set(results) == {("MISS", 200, b'{"n":1}')}


async def test_single_flight_shares_the_leaders_exception(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock, delay=0.05, raises=TimeoutError())
    results = await asyncio.gather(*(fetch(cache, up) for _ in range(20)), return_exceptions=True)
    assert up.calls == 1
    assert all(isinstance(r, TimeoutError) for r in results)


def exploding(gate: asyncio.Event) -> Callable[[], Awaitable[Entry]]:
    """A compute that fails with a bug (not a source failure) once `gate` is set."""

    async def compute() -> Entry:
        await gate.wait()
        raise RuntimeError("a bug in the leader's own request")

    return compute


async def seen(events: list[str], event: str, times: int = 1) -> None:
    """Return once the cache reported `event` `times` times; fail after 5 s."""
    for _ in range(500):
        if events.count(event) >= times:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{event!r} was not reported {times} times within 5 s: {events}")


async def test_followers_never_get_the_leaders_bug_they_compute_their_own_answer(
    cache: CompositeCache, clock: Clock
) -> None:
    events: list[str] = []
    cache.on_event = events.append
    gate = asyncio.Event()
    leader = asyncio.create_task(fetch(cache, exploding(gate)))
    await seen(events, "miss")  # it leads the flight
    own = Upstream(clock)
    followers = [asyncio.create_task(fetch(cache, own)) for _ in range(10)]
    await seen(events, "singleflight_wait", 10)
    gate.set()
    with pytest.raises(RuntimeError, match="leader's own"):
        await leader  # the leader's bug stays the leader's: it still fails loudly
    results = await asyncio.gather(*followers)
    assert set(results) == {("MISS", 200, b'{"n":1}')}
    assert own.calls == 1  # one follower led in its place, the others shared its answer


async def test_a_follower_of_a_leader_with_a_bug_gets_stale_if_error(
    cache: CompositeCache, clock: Clock
) -> None:
    policy = CachePolicy(60, 0, 0, 600, 10, False)
    await fetch(cache, Upstream(clock), policy)
    clock.now += 100
    events: list[str] = []
    cache.on_event = events.append
    gate = asyncio.Event()
    leader = asyncio.create_task(fetch(cache, exploding(gate), policy))
    await seen(events, "miss")
    failing = Upstream(clock, status=502)
    follower = asyncio.create_task(fetch(cache, failing, policy))
    await seen(events, "singleflight_wait")
    gate.set()
    with pytest.raises(RuntimeError):
        await leader
    assert await follower == ("STALE", 200, b'{"n":1}')
    assert failing.calls == 1


async def test_single_flight_survives_a_cancelled_leader(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock, delay=0.1)
    leader = asyncio.create_task(fetch(cache, up))
    await up.started.wait()
    followers = [asyncio.create_task(fetch(cache, up)) for _ in range(10)]
    await asyncio.sleep(0.01)
    leader.cancel()
    results = await asyncio.gather(*followers)
    assert {r[0] for r in results} == {"MISS"}
    assert len({r[2] for r in results}) == 1  # one of the followers led, the others shared it
    assert up.calls == 2


async def test_follower_gives_up_waiting_at_its_deadline(
    cache: CompositeCache, clock: Clock
) -> None:
    slow = Upstream(clock, delay=1.0)
    quick = Upstream(clock)
    leader = asyncio.create_task(fetch(cache, slow))
    await slow.started.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    lookup = await cache.fetch("k", [], POLICY, quick, deadline=loop.time() + 0.1)
    assert loop.time() - started < 0.5
    assert (lookup.state, quick.calls) == ("MISS", 1)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_bypass_computes_and_stores_the_fresh_answer(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock)
    await fetch(cache, up)
    assert await fetch(cache, up, bypass=True) == ("BYPASS", 200, b'{"n":2}')
    assert await fetch(cache, up) == ("HIT", 200, b'{"n":2}')


async def test_bypass_that_fails_falls_back_to_stale_if_error(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock)
    await fetch(cache, up)
    up.status = 503
    lookup = await cache.fetch("k", [], POLICY, up, deadline=far(), bypass=True)
    assert (lookup.state, lookup.error_stale, lookup.entry.body) == ("STALE", True, b'{"n":1}')


async def test_purge_by_key_and_by_tag_across_instances(
    new_store: StoreFactory, clock: Clock
) -> None:
    one = CompositeCache(new_store(), clock=clock)
    two = CompositeCache(new_store(), clock=clock)
    up = Upstream(clock)
    tags = {"a": "product:1", "b": "product:1", "c": "product:2", "d": "x"}

    async def state(key: str) -> str:
        lookup = await one.fetch(key, [tags[key], "all"], POLICY, up, deadline=far())
        return lookup.state

    assert [await state(k) for k in "abcd"] == ["MISS"] * 4
    assert await two.purge(keys=["a"]) == 1
    assert await two.purge(tags=["product:1"]) == 1  # "a" is gone already
    assert await two.purge(keys=["nope"], tags=["nope"]) == 0
    assert {k: await state(k) for k in "abcd"} == {"a": "MISS", "b": "MISS", "c": "HIT", "d": "HIT"}
    assert await one.purge(tags=["all"]) == 4
    assert await one.purge() == 0


async def test_events_are_reported(cache: CompositeCache, clock: Clock) -> None:
    events: list[str] = []
    cache.on_event = events.append
    up = Upstream(clock)
    await fetch(cache, up)
    await fetch(cache, up)
    clock.now += 61
    await fetch(cache, up)
    await asyncio.sleep(0.05)
    await fetch(cache, up, bypass=True)
    assert events == ["miss", "hit", "stale", "refresh", "bypass"]


async def test_ping_and_close(cache: CompositeCache) -> None:
    await cache.ping()
    await cache.close()


async def test_a_bug_in_compute_fails_the_fetch_loudly(cache: CompositeCache, clock: Clock) -> None:
    up = Upstream(clock, raises=RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        await fetch(cache, up)
    up.raises = None
    assert (await fetch(cache, up))[0] == "MISS"  # nothing was left locked or in flight


async def test_a_bug_in_a_background_refresh_is_logged_and_keeps_the_stale_copy(
    cache: CompositeCache, clock: Clock
) -> None:
    up = Upstream(clock)
    await fetch(cache, up)
    clock.now += 61
    up.raises = RuntimeError("bug")
    with capture_logs() as logs:
        assert (await fetch(cache, up))[0] == "STALE"
        await asyncio.sleep(0.05)
    assert [e["event"] for e in logs] == ["cache_refresh_crashed"]
    assert logs[0]["log_level"] == "error"
    up.raises = None
    assert (await fetch(cache, up))[0] == "STALE"  # the lock was released: it may refresh again
    await asyncio.sleep(0.05)
    assert (await fetch(cache, up))[0] == "HIT"


class FlakyAcquires:
    """A store whose lock-taking calls (`lookup`, then `acquire`) fail (`CacheUnavailable`) at
    the given call numbers."""

    def __init__(self, inner: Store, failing: set[int]) -> None:
        self.inner = inner
        self.failing = failing
        self.acquires = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def acquire(self, key: str, token: str, hold_s: float) -> tuple[bool, bytes | None]:
        self.acquires += 1
        if self.acquires in self.failing:
            raise CacheUnavailable("scripted: timed out")
        return await self.inner.acquire(key, token, hold_s)

    async def lookup(
        self, key: str, token: str, hold_s: float, windows: Windows, now: float
    ) -> tuple[bool, bytes | None]:
        self.acquires += 1
        if self.acquires in self.failing:
            raise CacheUnavailable("scripted: timed out")
        return await self.inner.lookup(key, token, hold_s, windows, now)


@pytest.mark.parametrize(
    ("failing", "computes"),
    [({2, 3}, 0), ({2, 3, 4}, 1), ({1}, 1)],
    ids=["two-failed-polls-waited-through", "three-give-up", "first-acquire-fails"],
)
async def test_a_follower_waits_through_a_few_failed_polls_once_it_saw_the_lock_held(
    new_store: StoreFactory, clock: Clock, failing: set[int], computes: int
) -> None:
    leader_store = new_store()
    store = FlakyAcquires(new_store(), failing)
    follower = CompositeCache(store, clock=clock)
    leader = Upstream(clock)
    assert (await leader_store.acquire("k", "leader", 5))[0]
    compute = Upstream(clock)
    waiting = asyncio.create_task(fetch(follower, compute))
    await asyncio.sleep(0.2)  # five polls at least: 5, 10, 20, 40, 50 ms apart
    entry = await leader()
    await leader_store.put("k", encode(entry), 60, [], unlock="leader")
    state, status, _ = await waiting
    assert (state, status, compute.calls) == ("MISS", 200, computes)
