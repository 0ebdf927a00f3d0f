"""The store as the cache policy uses it: every call that fails degrades to a miss (with one
warning per `WARN_EVERY_S`), stored bytes are decoded or refused, fresh answers are held in the
near tier, events are reported, and purges reach both tiers."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Sequence

import structlog

from cache.entry import CorruptEntry, Entry, decode, encode
from cache.lookup import Ask, Lookup, error_stale
from cache.near import NearCache
from cache.store import CacheUnavailable, Store

log = structlog.get_logger("cache")

WARN_EVERY_S = 10.0
"""At most one backend-failure warning per this many seconds; the rest are counted into it."""


class Backend:
    """One store (and its near tier) for the cache policy; a failing store only costs a miss."""

    def __init__(
        self,
        store: Store,
        near: NearCache | None,
        clock: Callable[[], float],
        compress_min_bytes: int,
        max_body_bytes: int,
        on_event: Callable[[str], None] | None,
    ) -> None:
        self.store = store
        self.near = near
        self.clock = clock
        self.on_event = on_event
        self._compress_min_bytes = compress_min_bytes
        self._max_body_bytes = max_body_bytes
        self._token_prefix = uuid.uuid4().hex[:16]
        self._tokens = itertools.count()
        self._warned_at = float("-inf")
        self._unwarned = 0

    def event(self, name: str) -> None:
        """Report `name` to `on_event`, if set."""
        if self.on_event is not None:
            self.on_event(name)

    def failed(self, exc: Exception) -> None:
        """Count a backend failure as an "error" event and warn, at most once per WARN_EVERY_S."""
        self.event("error")
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S:
            self._unwarned += 1
            return
        log.warning("cache_unavailable", error=str(exc), suppressed=self._unwarned)
        self._warned_at = now
        self._unwarned = 0

    def token(self) -> str:
        """Return a lock token unique across processes."""
        # A random prefix per cache, and a counter per fetch (cheap).
        return f"{self._token_prefix}{next(self._tokens)}"

    def decode(self, data: bytes | None) -> Entry | None:
        """Return the entry stored as `data`, or None if there is none or it is not one."""
        if data is None:
            return None
        try:
            return decode(data, self._max_body_bytes)
        except CorruptEntry as exc:
            self.failed(exc)  # Another codec version or garbage: recomputed and overwritten.
            return None

    async def get(self, key: str) -> Entry | None:
        """Return the stored entry for `key`, or None (a failing store reads as empty)."""
        try:
            data = await self.store.get(key)
        except CacheUnavailable as exc:
            self.failed(exc)
            return None
        return self.decode(data)

    async def put(self, ask: Ask, entry: Entry, lock: str) -> bool:
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
            self.failed(exc)
        return False

    async def keep(self, ask: Ask, entry: Entry, lock: str, generation: int, state: str) -> Lookup:
        """Store a computed `entry` (releasing `lock`) and return it as answered with `state`."""
        stored = await self.put(ask, entry, lock)
        if stored:
            self.hold(ask, entry, generation)
        age = max(0.0, self.clock() - entry.written_at)
        fresh = max(0.0, ask.policy.ttl_for(entry) - age) if stored else 0.0
        return Lookup(entry, state, age, fresh, False)

    async def release(self, key: str, token: str) -> None:
        """Release the lock `token` holds on `key`; a failure leaves it to expire by itself."""
        try:
            await self.store.release(key, token)
        except CacheUnavailable as exc:
            self.failed(exc)  # The lock expires by itself; followers wait at most their deadline.

    def if_error(self, ask: Ask, cached: Entry | None) -> Lookup | None:
        """Return the stored copy as an error-stale answer if it is young enough for that."""
        stale = error_stale(ask.policy, cached, self.clock())
        if stale is not None:
            self.event("stale_if_error")
        return stale

    def generation(self) -> int:
        """Return the near tier's purge generation, to hold only what no purge overtook."""
        return 0 if self.near is None else self.near.generation

    def hold(self, ask: Ask, entry: Entry, generation: int) -> None:
        """Keep a fresh entry in the near tier, never past its freshness (stale is Redis's)."""
        if self.near is not None:
            fresh_until = entry.written_at + ask.policy.ttl_for(entry)
            self.near.put(ask.key, entry, self.clock(), fresh_until, ask.tags, generation)

    async def purge(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete `keys` and every key under `tags` from both tiers; return how many existed.

        Raises `CacheUnavailable` when the store fails: a purge that did not happen must say so.
        """
        try:
            return await self.store.purge(keys, tags)
        finally:
            # After the store's delete, so that a read of the old bytes that was in flight meanwhile
            # is not held (the eviction moves the generation it was read under).
            if self.near is not None:
                self.near.evict(keys, tags)
