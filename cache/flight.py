"""Single-flight: one lookup (and at most one fan-out) per key in this process, and one fan-out per
key across processes through the store's lock, whose holder the others poll for its value."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cache.backend import Backend
from cache.entry import Entry
from cache.lookup import Ask, Lookup, landed
from cache.store import CacheUnavailable

LOCK_MARGIN_S = 0.25
"""A miss lock outlives its leader's deadline by this much, so followers see the value land."""

_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05
_MAX_LEADS = 3
_MAX_POLLS = 1000
_MAX_POLL_FAILURES = 3

# What a fetch that shared another's lookup counts as: the state it answers with.
_SHARED_EVENTS = {"HIT": "hit", "STALE": "stale"}


class Flights:
    """The flights of keys in this process: each key's leader looks up (or computes) for all."""

    def __init__(self, backend: Backend, revalidate: Callable[[Ask, Entry], None]) -> None:
        self._backend = backend
        self._revalidate = revalidate
        self.flying: dict[str, asyncio.Future[Lookup]] = {}
        """Each key in flight and the future of its leader's answer."""
        self._computing: set[str] = set()
        """Keys whose flight in this process found no answer to serve: a fan-out, or a wait."""

    async def join(self, ask: Ask, deadline: float) -> Lookup:
        """Return the answer of the flight of `ask.key`, leading it if there is none (or if its
        leader was cancelled), or computing alone once `deadline` comes first."""
        loop = asyncio.get_running_loop()
        event = self._backend.event
        # Bounded: a fetch waits again only when the leader it waited for was cancelled.
        for attempt in range(_MAX_LEADS):
            flight = self.flying.get(ask.key)
            if flight is None:
                return await self.fly(ask, deadline, waited=attempt > 0)
            # One lookup per key in flight in this process: a hot key's hits share one read.
            # A wait for a fan-out is reported as it starts; one for a read, by what it read.
            told = ask.key in self._computing
            if told:
                event("singleflight_wait")
            await asyncio.wait((flight,), timeout=max(0.0, deadline - loop.time()))
            if not flight.done():
                if not told:
                    event("singleflight_wait")
                break  # Our deadline came first: answer for ourselves (compute is bounded too).
            if not flight.cancelled():
                lookup = flight.result()  # The leader's answer, or its deadline's TimeoutError.
                if not told:
                    event(_SHARED_EVENTS.get(lookup.state, "singleflight_wait"))
                return lookup
            if not told:
                event("singleflight_wait")
        return await self._compute(ask, None, lock="")

    async def fly(self, ask: Ask, deadline: float, waited: bool) -> Lookup:
        """Lead the flight of `ask.key`: each fetch of it that arrives meanwhile gets our answer."""
        flight: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self.flying[ask.key] = flight
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
            if self.flying.get(ask.key) is flight:
                del self.flying[ask.key]
                self._computing.discard(ask.key)

    async def _lead(self, ask: Ask, deadline: float, waited: bool) -> Lookup:
        """Serve the stored entry, or compute under the cross-process lock taken with the same
        read (one round trip), or wait for the process that holds it. After a wait for another
        fetch's fan-out (`waited`), a fresh entry is the MISS that fan-out answered."""
        backend = self._backend
        token = backend.token()
        generation = backend.generation()
        now = backend.clock()
        hold = max(0.0, deadline - asyncio.get_running_loop().time()) + LOCK_MARGIN_S
        policy = ask.policy
        try:
            got, data = await backend.store.lookup(ask.key, token, hold, policy.windows, now)
        except CacheUnavailable as exc:
            backend.failed(exc)
            backend.event("miss")
            self._computing.add(ask.key)
            # With our token: a lookup that timed out may still have taken the lock in Redis, and
            # storing the value releases it instead of leaving the others to wait for its expiry.
            return await self._compute(ask, None, lock=token)
        cached = backend.decode(data)
        age = 0.0 if cached is None else max(0.0, now - cached.written_at)
        if cached is not None and age < policy.window_for(cached):
            if got:
                await backend.release(ask.key, token)  # Never taken by a store that agrees.
            ttl = policy.ttl_for(cached)
            if age < ttl:
                backend.event("hit")
                backend.hold(ask, cached, generation)
                return Lookup(cached, "MISS" if waited else "HIT", age, ttl - age, False)
            backend.event("stale")
            self._revalidate(ask, cached)
            return Lookup(cached, "STALE", age, 0.0, False)
        backend.event("miss")
        self._computing.add(ask.key)
        if got:
            return await self._compute(ask, cached, lock=token)
        backend.event("singleflight_wait")
        return await self._wait(ask, deadline, cached, token)

    async def _wait(self, ask: Ask, deadline: float, cached: Entry | None, token: str) -> Lookup:
        """Poll for the value another process computes, taking the lock if it lets go first."""
        backend = self._backend
        loop = asyncio.get_running_loop()
        pause = _POLL_FIRST_S
        failures = 0
        for _ in range(_MAX_POLLS):
            if loop.time() + pause >= deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)
            generation = backend.generation()
            try:
                got, data = await backend.store.acquire(
                    ask.key, token, max(0.0, deadline - loop.time()) + LOCK_MARGIN_S
                )
            except CacheUnavailable as exc:
                backend.failed(exc)
                failures += 1
                # While another process holds the lock, its value is on the way: a few failed
                # polls (a busy host's, often) are waited through rather than computing twice.
                if failures >= _MAX_POLL_FAILURES:
                    break
                continue
            failures = 0
            # Read with the lock: another process may have stored the value since our read.
            fresh = landed(backend.decode(data), ask.policy, cached, backend.clock())
            if fresh is not None:
                backend.hold(ask, fresh.entry, generation)
            if got:
                if fresh is not None:
                    await backend.release(ask.key, token)
                    return fresh
                return await self._compute(ask, cached, lock=token)
            if fresh is not None:
                return fresh
        # With our token: an acquire that timed out may still have taken the lock in Redis, and
        # storing the value releases it instead of leaving the others to wait for its expiry.
        return await self._compute(ask, cached, lock=token)

    async def _compute(self, ask: Ask, cached: Entry | None, *, lock: str) -> Lookup:
        """Run the fan-out and store its answer (releasing `lock`); on failure, serve `cached`
        if stale-if-error allows it."""
        backend = self._backend
        generation = backend.generation()
        try:
            entry = await ask.compute()
        except TimeoutError:
            if lock:
                await backend.release(ask.key, lock)
            stale = backend.if_error(ask, cached)
            if stale is None:
                raise
            return stale
        except BaseException:
            if lock:
                await backend.release(ask.key, lock)
            raise
        if entry.status >= 500:
            if lock:
                await backend.release(ask.key, lock)
            return backend.if_error(ask, cached) or Lookup(entry, "MISS", 0.0, 0.0, False)
        return await backend.keep(ask, entry, lock, generation, "MISS")
