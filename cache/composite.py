"""The composite-response cache policy: TTLs by outcome, stale-while-revalidate, stale-if-error,
single-flight within and across processes, negative caching, purge by key or tag, and an optional
near tier in process memory for fresh answers.

`CompositeCache.on_event`, when set, is called with one of: "hit", "miss", "stale", "bypass",
"stale_if_error", "singleflight_wait" (a fetch that waited for another's compute), "refresh" (a
background refresh started), "refresh_failed", "error" (the backend failed; went uncached).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog

from cache.entry import (
    COMPRESS_MIN_BYTES,
    MAX_BODY_BYTES,
    CorruptEntry,
    Entry,
    decode,
    encode,
    stored_limit,
)
from cache.memory import MemoryStore
from cache.near import NearCache
from cache.policy import CachePolicy, CacheSettings, servable_stale
from cache.redis import redis_store
from cache.store import CacheUnavailable, Store

log = structlog.get_logger("cache")

REFRESH_LOCK_S = 10.0
"""How long a background refresh holds the cross-process lock, at most, if it never releases."""

LOCK_MARGIN_S = 0.25
"""A miss lock outlives its leader's deadline by this much, so followers see the value land."""

WARN_EVERY_S = 10.0
"""At most one backend-failure warning per this many seconds; the rest are counted into it."""

_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05
_MAX_LEADS = 3
_MAX_POLLS = 1000
_MAX_POLL_FAILURES = 3


@dataclass(slots=True)
class _Ask:
    """One fetch as it travels through the cache: its key, tags, policy and how to compute it."""

    key: str
    tags: Sequence[str]
    policy: CachePolicy
    compute: Compute


@dataclass(slots=True)  # made per request: not frozen, whose __init__ costs three times more
class Lookup:
    """What a fetch answered with, and how: HIT, MISS, STALE or BYPASS, and the entry's age."""

    entry: Entry
    state: str
    age_s: float
    fresh_for_s: float
    error_stale: bool


Compute = Callable[[], Awaitable[Entry]]

# What a fetch that shared another's lookup counts as: the state it answers with.
_SHARED_EVENTS = {"HIT": "hit", "STALE": "stale"}


class CompositeCache:
    """Composite answers cached in a `Store`; a failing store only ever costs a miss."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        compress_min_bytes: int = COMPRESS_MIN_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_event: Callable[[str], None] | None = None,
        near: NearCache | None = None,
    ) -> None:
        self.store = store
        self._local = store if isinstance(store, MemoryStore) else None
        self.near = near
        self.on_event = on_event
        self._clock = clock
        self._compress_min_bytes = compress_min_bytes
        self._max_body_bytes = max_body_bytes
        self._flights: dict[str, asyncio.Future[Lookup]] = {}
        self._token_prefix = uuid.uuid4().hex[:16]
        self._tokens = itertools.count()
        self._computing: set[str] = set()
        """Keys whose flight in this process found no answer to serve: a fan-out, or a wait."""
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_at = float("-inf")
        self._unwarned = 0

    async def fetch(
        self,
        key: str,
        tags: Sequence[str],
        policy: CachePolicy,
        compute: Compute,
        *,
        deadline: float,
        bypass: bool = False,
    ) -> Lookup:
        """Return the answer for `key`: stored if fresh (or stale and revalidating), else computed
        once per key however many ask, and stored by its outcome's TTL."""
        if bypass:
            return await self._bypass(_Ask(key, tags, policy, compute))
        if not policy.stores:
            # Nothing this endpoint answers is ever stored: no read could find anything, and no
            # lock would guard a write. The backend is not asked at all.
            self._event("bypass")
            return Lookup(await compute(), "BYPASS", 0.0, 0.0, False)
        if self._local is not None and key not in self._flights:
            # An in-process store reads for free: a fresh entry is served without a flight, a
            # lock token or a lookup; anything else goes the whole way (one more read, no I/O).
            cached = self._decode(await self._local.get(key))
            if cached is not None:
                age = max(0.0, self._clock() - cached.written_at)
                ttl = policy.ttl_for(cached)
                if age < ttl:
                    self._event("hit")
                    return Lookup(cached, "HIT", age, ttl - age, False)
        ask = _Ask(key, tags, policy, compute)
        near = self.near
        if near is not None:
            now = self._clock()
            held = near.get(key, now)
            if held is not None:
                # Held only while fresh: no network, no decode, no policy beyond the TTL.
                self._event("hit")
                age = max(0.0, now - held.written_at)
                return Lookup(held, "HIT", age, max(0.0, policy.ttl_for(held) - age), False)
            near.start()
        if key not in self._flights:
            return await self._fly(ask, deadline, waited=False)
        return await self._single_flight(ask, deadline)

    async def purge(self, *, keys: Sequence[str] = (), tags: Sequence[str] = ()) -> int:
        """Delete the given keys and every key under the given tags; return how many existed.

        Raises `CacheUnavailable` when the backend fails: a purge that did not happen must say so.
        """
        if not keys and not tags:
            return 0
        try:
            return await self.store.purge(keys, tags)
        finally:
            # After the store's delete, so that a read of the old bytes that was in flight meanwhile
            # is not held (the eviction moves the generation it was read under).
            if self.near is not None:
                self.near.evict(keys, tags)

    async def ping(self) -> None:
        """Return when the backend answers; raise `CacheUnavailable` when it does not."""
        await self.store.ping()

    async def close(self) -> None:
        """Cancel background refreshes, stop the near tier and close the backend."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.near is not None:
            await self.near.close()
        await self.store.close()

    # --- miss: single-flight ------------------------------------------------------------------

    async def _single_flight(self, ask: _Ask, deadline: float) -> Lookup:
        loop = asyncio.get_running_loop()
        # Bounded: a fetch waits again only when the leader it waited for was cancelled.
        for attempt in range(_MAX_LEADS):
            flight = self._flights.get(ask.key)
            if flight is None:
                return await self._fly(ask, deadline, waited=attempt > 0)
            # One lookup per key in flight in this process: a hot key's hits share one read.
            # A wait for a fan-out is reported as it starts; one for a read, by what it read.
            told = ask.key in self._computing
            if told:
                self._event("singleflight_wait")
            await asyncio.wait((flight,), timeout=max(0.0, deadline - loop.time()))
            if not flight.done():
                if not told:
                    self._event("singleflight_wait")
                break  # Our deadline came first: answer for ourselves (compute is bounded too).
            if not flight.cancelled():
                lookup = flight.result()  # The leader's answer, or its deadline's TimeoutError.
                if not told:
                    self._event(_SHARED_EVENTS.get(lookup.state, "singleflight_wait"))
                return lookup
            if not told:
                self._event("singleflight_wait")
        return await self._compute(ask, None, lock="")

    async def _fly(self, ask: _Ask, deadline: float, waited: bool) -> Lookup:
        """Lead the flight for `key`: every fetch of it that arrives meanwhile gets our answer."""
        flight: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self._flights[ask.key] = flight
        try:
            lookup = await self._lead(ask, deadline, waited)
        except asyncio.CancelledError:
            flight.cancel()  # Followers see it and one of them leads in our place.
            raise
        except TimeoutError as exc:
            flight.set_exception(exc)
            flight.exception()  # Marked retrieved: there may be no follower, and that is fine.
            raise
        except BaseException:
            # A bug in the leader's own request (a value only it had, say) is its own 500: the
            # followers are told, as for a cancelled leader, to lead or compute for themselves.
            flight.cancel()
            raise
        else:
            flight.set_result(lookup)
            return lookup
        finally:
            if self._flights.get(ask.key) is flight:
                del self._flights[ask.key]
                self._computing.discard(ask.key)

    async def _lead(self, ask: _Ask, deadline: float, waited: bool) -> Lookup:
        """Serve the stored entry, or compute under the cross-process lock taken with the same
        read (one round trip), or wait for the process that holds it. After a wait for another
        fetch's fan-out (`waited`), a fresh entry is the MISS that fan-out answered."""
        token = self._token()
        generation = self._generation()
        now = self._clock()
        hold = max(0.0, deadline - asyncio.get_running_loop().time()) + LOCK_MARGIN_S
        policy = ask.policy
        try:
            got, data = await self.store.lookup(ask.key, token, hold, policy.windows, now)
        except CacheUnavailable as exc:
            self._failed(exc)
            self._event("miss")
            self._computing.add(ask.key)
            # With our token: a lookup that timed out may still have taken the lock in Redis, and
            # storing the value releases it instead of leaving the others to wait for its expiry.
            return await self._compute(ask, None, lock=token)
        cached = self._decode(data)
        age = 0.0 if cached is None else max(0.0, now - cached.written_at)
        if cached is not None and age < policy.window_for(cached):
            if got:
                await self._release(ask.key, token)  # Never taken by a store that agrees.
            ttl = policy.ttl_for(cached)
            if age < ttl:
                self._event("hit")
                self._hold(ask, cached, generation)
                return Lookup(cached, "MISS" if waited else "HIT", age, ttl - age, False)
            self._event("stale")
            self._revalidate(ask, cached)
            return Lookup(cached, "STALE", age, 0.0, False)
        self._event("miss")
        self._computing.add(ask.key)
        if got:
            return await self._compute(ask, cached, lock=token)
        self._event("singleflight_wait")
        return await self._wait(ask, deadline, cached, token)

    async def _wait(self, ask: _Ask, deadline: float, cached: Entry | None, token: str) -> Lookup:
        """Poll for the value another process computes, taking the lock if it lets go first."""
        loop = asyncio.get_running_loop()
        pause = _POLL_FIRST_S
        failures = 0
        for _ in range(_MAX_POLLS):
            if loop.time() + pause >= deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)
            generation = self._generation()
            try:
                got, data = await self.store.acquire(
                    ask.key, token, max(0.0, deadline - loop.time()) + LOCK_MARGIN_S
                )
            except CacheUnavailable as exc:
                self._failed(exc)
                failures += 1
                # While another process holds the lock, its value is on the way: a few failed
                # polls (a busy host's, often) are waited through rather than computing twice.
                if failures >= _MAX_POLL_FAILURES:
                    break
                continue
            failures = 0
            # Read with the lock: another process may have stored the value since our read.
            landed = self._landed(self._decode(data), ask.policy, cached)
            if landed is not None:
                self._hold(ask, landed.entry, generation)
            if got:
                if landed is not None:
                    await self._release(ask.key, token)
                    return landed
                return await self._compute(ask, cached, lock=token)
            if landed is not None:
                return landed
        # With our token: an acquire that timed out may still have taken the lock in Redis, and
        # storing the value releases it instead of leaving the others to wait for its expiry.
        return await self._compute(ask, cached, lock=token)

    def _landed(
        self, entry: Entry | None, policy: CachePolicy, cached: Entry | None
    ) -> Lookup | None:
        """Return `entry` as a fresh answer if it was written since `cached` and is still fresh."""
        if entry is None or (cached is not None and entry.written_at <= cached.written_at):
            return None
        age = max(0.0, self._clock() - entry.written_at)
        ttl = policy.ttl_for(entry)
        if age >= ttl:
            return None
        return Lookup(entry, "MISS", age, ttl - age, False)

    async def _compute(self, ask: _Ask, cached: Entry | None, *, lock: str) -> Lookup:
        generation = self._generation()
        try:
            entry = await ask.compute()
        except TimeoutError:
            if lock:
                await self._release(ask.key, lock)
            stale = self._if_error(ask.policy, cached)
            if stale is None:
                raise
            return stale
        except BaseException:
            if lock:
                await self._release(ask.key, lock)
            raise
        if entry.status >= 500:
            if lock:
                await self._release(ask.key, lock)
            return self._if_error(ask.policy, cached) or Lookup(entry, "MISS", 0.0, 0.0, False)
        stored = await self._put(ask, entry, lock)
        if stored:
            self._hold(ask, entry, generation)
        age = max(0.0, self._clock() - entry.written_at)
        fresh = max(0.0, ask.policy.ttl_for(entry) - age) if stored else 0.0
        return Lookup(entry, "MISS", age, fresh, False)

    def _if_error(self, policy: CachePolicy, cached: Entry | None) -> Lookup | None:
        """Return the stored copy as an error-stale answer if it is young enough for that."""
        if cached is None or not servable_stale(cached):
            return None
        age = max(0.0, self._clock() - cached.written_at)
        if age >= policy.ttl_for(cached) + policy.stale_if_error_s:
            return None
        self._event("stale_if_error")
        return Lookup(cached, "STALE", age, 0.0, True)

    # --- bypass and revalidation --------------------------------------------------------------

    async def _bypass(self, ask: _Ask) -> Lookup:
        self._event("bypass")
        generation = self._generation()
        try:
            entry = await ask.compute()
        except TimeoutError:
            stale = self._if_error(ask.policy, await self._get(ask.key))
            if stale is None:
                raise
            return stale
        if entry.status >= 500:
            stale = self._if_error(ask.policy, await self._get(ask.key))
            return stale or Lookup(entry, "BYPASS", 0.0, 0.0, False)
        stored = await self._put(ask, entry, lock="")
        if stored:
            self._hold(ask, entry, generation)
        age = max(0.0, self._clock() - entry.written_at)
        fresh = max(0.0, ask.policy.ttl_for(entry) - age) if stored else 0.0
        return Lookup(entry, "BYPASS", age, fresh, False)

    def _revalidate(self, ask: _Ask, stale: Entry) -> None:
        """Start one background refresh of `key` unless this process already runs one."""
        if ask.key in self._refreshing:
            return
        self._refreshing.add(ask.key)
        task = asyncio.create_task(self._refresh(ask, stale))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, ask: _Ask, stale: Entry) -> None:
        token = self._token()
        try:
            try:
                got, data = await self.store.acquire(ask.key, token, REFRESH_LOCK_S)
            except CacheUnavailable as exc:
                self._failed(exc)
                return  # The copy we serve came from the backend; without it, don't stampede.
            if not got:
                return  # Another process is refreshing (or computing) this key.
            if self._landed(self._decode(data), ask.policy, stale) is not None:
                await self._release(ask.key, token)
                return  # Another process refreshed it between our read and our lock.
            self._event("refresh")
            generation = self._generation()
            try:
                entry = await ask.compute()
            except TimeoutError:
                entry = None
            if entry is None or entry.status >= 500:
                self._event("refresh_failed")
                await self._release(ask.key, token)
                return
            if await self._put(ask, entry, token):
                self._hold(ask, entry, generation)
        except Exception:
            # A background task has no caller to fail: a bug here is logged loudly, not lost.
            log.exception("cache_refresh_crashed", key=ask.key)
            self._event("refresh_failed")
            await self._release(ask.key, token)
        finally:
            self._refreshing.discard(ask.key)

    # --- backend calls that degrade to a miss -------------------------------------------------

    async def _get(self, key: str) -> Entry | None:
        try:
            data = await self.store.get(key)
        except CacheUnavailable as exc:
            self._failed(exc)
            return None
        return self._decode(data)

    def _decode(self, data: bytes | None) -> Entry | None:
        if data is None:
            return None
        try:
            return decode(data, self._max_body_bytes)
        except CorruptEntry as exc:
            self._failed(exc)  # Another codec version or garbage: recomputed and overwritten.
            return None

    async def _put(self, ask: _Ask, entry: Entry, lock: str) -> bool:
        """Store `entry` for its outcome's lifetime and release `lock`; return whether stored."""
        # An answer longer than an entry read back may be is served, but not stored: stored, it
        # would read as corrupt, a miss every time.
        keep = ask.policy.keep_for(entry) if len(entry.body) <= self._max_body_bytes else 0.0
        try:
            if keep > 0:
                await self.store.put(
                    ask.key, encode(entry, self._compress_min_bytes), keep, ask.tags, unlock=lock
                )
                return True
            if lock:
                await self.store.release(ask.key, lock)
        except CacheUnavailable as exc:
            self._failed(exc)
        return False

    def _token(self) -> str:
        # Unique across processes (a random prefix per cache) and cheap per fetch (a counter).
        return f"{self._token_prefix}{next(self._tokens)}"

    def _generation(self) -> int:
        return 0 if self.near is None else self.near.generation

    def _hold(self, ask: _Ask, entry: Entry, generation: int) -> None:
        """Keep a fresh entry in the near tier, never past its freshness (stale is Redis's)."""
        if self.near is not None:
            fresh_until = entry.written_at + ask.policy.ttl_for(entry)
            self.near.put(ask.key, entry, self._clock(), fresh_until, ask.tags, generation)

    async def _release(self, key: str, token: str) -> None:
        try:
            await self.store.release(key, token)
        except CacheUnavailable as exc:
            self._failed(exc)  # The lock expires by itself; followers wait at most their deadline.

    def _failed(self, exc: Exception) -> None:
        self._event("error")
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S:
            self._unwarned += 1
            return
        log.warning("cache_unavailable", error=str(exc), suppressed=self._unwarned)
        self._warned_at = now
        self._unwarned = 0

    def _event(self, name: str) -> None:
        if self.on_event is not None:
            self.on_event(name)


def open_cache(settings: CacheSettings) -> CompositeCache:
    """Return the cache `settings.url` names (`memory://`, `redis://`, `rediss://`,
    `redis+cluster://host:port`), with its near tier if `settings.near` asks for one; no
    connection is made until it is used (the near tier subscribes to purges at the first fetch)."""
    store: Store
    near = None
    if urlsplit(settings.url).scheme == "memory":
        store = MemoryStore(settings.memory_max_entries, settings.memory_max_bytes)
    else:
        redis = redis_store(
            settings.url,
            settings.key_prefix,
            settings.op_timeout_s,
            stored_limit(settings.max_entry_bytes),
        )
        if settings.near is not None:
            near = NearCache(settings.near.max_entries, settings.near.ttl_s, redis.listen)
        store = redis
    return CompositeCache(
        store,
        compress_min_bytes=settings.compress_min_bytes,
        max_body_bytes=settings.max_entry_bytes,
        near=near,
    )
