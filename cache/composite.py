"""The composite-response cache policy: TTLs by outcome, stale-while-revalidate, stale-if-error,
single-flight within and across processes, negative caching, purge by key or tag, and an optional
near tier in process memory for fresh answers. Its parts: `backend` (store calls that degrade to a
miss, the near tier, purge), `flight` (single-flight and the fetch decision), `refresh` (background
revalidation), `lookup` (what a fetch asks and answers).

`CompositeCache.on_event`, when set, is called with one of: "hit", "miss", "stale", "bypass",
"stale_if_error", "singleflight_wait" (a fetch that waited for another's compute), "refresh" (a
background refresh started), "refresh_failed", "error" (the backend failed; went uncached).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from cache.backend import Backend
from cache.entry import COMPRESS_MIN_BYTES, MAX_BODY_BYTES, stored_limit
from cache.flight import Flights
from cache.lookup import Ask, Compute, Lookup
from cache.memory import MemoryStore
from cache.near import NearCache
from cache.policy import CachePolicy, CacheSettings
from cache.redis import redis_store
from cache.refresh import Refresher
from cache.store import Store

__all__ = ["CompositeCache", "Compute", "Lookup", "open_cache"]


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
        self.near = near
        backend = Backend(store, near, clock, compress_min_bytes, max_body_bytes, on_event)
        self._backend = backend
        self._refresher = Refresher(backend)
        self._flights = Flights(backend, self._refresher.revalidate)
        # The hit path's names, bound once: a fetch looks each up on this object only.
        self._local = store if isinstance(store, MemoryStore) else None
        self._flying = self._flights.flying
        self._clock = clock
        self._decode = backend.decode
        self._event = backend.event

    @property
    def on_event(self) -> Callable[[str], None] | None:
        """The callable told of every cache event (see the module's docstring), if any."""
        return self._backend.on_event

    @on_event.setter
    def on_event(self, on_event: Callable[[str], None] | None) -> None:
        self._backend.on_event = on_event

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
            return await self._bypass(Ask(key, tags, policy, compute))
        if not policy.stores:
            # Nothing this endpoint answers is ever stored: no read could find anything, and no
            # lock would guard a write. The backend is not asked at all.
            self._event("bypass")
            return Lookup(await compute(), "BYPASS", 0.0, 0.0, False)
        if self._local is not None and key not in self._flying:
            # An in-process store reads for free: a fresh entry is served without a flight, a
            # lock token or a lookup; anything else goes the whole way (one more read, no I/O).
            cached = self._decode(await self._local.get(key))
            if cached is not None:
                age = max(0.0, self._clock() - cached.written_at)
                ttl = policy.ttl_for(cached)
                if age < ttl:
                    self._event("hit")
                    return Lookup(cached, "HIT", age, ttl - age, False)
        ask = Ask(key, tags, policy, compute)
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
        if key not in self._flying:
            return await self._flights.fly(ask, deadline, waited=False)
        return await self._flights.join(ask, deadline)

    async def purge(self, *, keys: Sequence[str] = (), tags: Sequence[str] = ()) -> int:
        """Delete the given keys and every key under the given tags; return how many existed.

        Raises `CacheUnavailable` when the backend fails: a purge that did not happen must say so.
        """
        if not keys and not tags:
            return 0
        return await self._backend.purge(keys, tags)

    async def ping(self) -> None:
        """Return when the backend answers; raise `CacheUnavailable` when it does not."""
        await self.store.ping()

    async def close(self) -> None:
        """Cancel background refreshes, stop the near tier and close the backend."""
        await self._refresher.close()
        if self.near is not None:
            await self.near.close()
        await self.store.close()

    async def _bypass(self, ask: Ask) -> Lookup:
        """Compute regardless of what is stored (the client asked for it), and store the answer."""
        backend = self._backend
        backend.event("bypass")
        generation = backend.generation()
        try:
            entry = await ask.compute()
        except TimeoutError:
            stale = backend.if_error(ask, await backend.get(ask.key))
            if stale is None:
                raise
            return stale
        if entry.status >= 500:
            stale = backend.if_error(ask, await backend.get(ask.key))
            return stale or Lookup(entry, "BYPASS", 0.0, 0.0, False)
        return await backend.keep(ask, entry, "", generation, "BYPASS")


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
