"""The near tier: the hottest answers for a few seconds in process memory, in front of Redis, and
forgotten as soon as any instance purges them."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import structlog

from cache.entry import Entry
from cache.store import CacheUnavailable

log = structlog.get_logger("cache")

OnPurge = Callable[[Sequence[str], Sequence[str]], None]
"""Told the keys and tags one instance purged."""

Listen = Callable[[OnPurge, Callable[[], None]], Awaitable[None]]
"""Subscribes to purges, calls its second argument once subscribed and its first per purge; it
returns or raises `CacheUnavailable` when the subscription is lost."""

RESUBSCRIBE_FIRST_S = 0.05
RESUBSCRIBE_MAX_S = 1.0


class NearCache:
    """Decoded entries by key, each until the earlier of the tier's TTL and the end of its
    freshness, LRU past `max_entries`; used only while purges can be heard.

    Without `listen` (one process, nobody else purges) the tier is always in use.
    """

    def __init__(self, max_entries: int, ttl_s: float, listen: Listen | None = None) -> None:
        self.ttl_s = ttl_s
        self.generation = 0
        """Moves on every purge heard and every lost subscription: a `put` of an entry read
        before that is dropped, since the purge may have been meant for it."""
        self._max_entries = max_entries
        self._items: OrderedDict[str, tuple[Entry, float, tuple[str, ...]]] = OrderedDict()
        self._listen = listen
        self._live = listen is None
        self._task: asyncio.Task[None] | None = None
        self._pause = RESUBSCRIBE_FIRST_S

    def __len__(self) -> int:
        return len(self._items)

    @property
    def live(self) -> bool:
        """Return whether the tier is in use: it hears purges (or has nobody to hear)."""
        return self._live

    def get(self, key: str, now: float) -> Entry | None:
        """Return the entry held for `key` if it has not expired by `now`, else None."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(
        self,
        key: str,
        entry: Entry,
        now: float,
        fresh_until: float,
        tags: Sequence[str],
        generation: int,
    ) -> None:
        """Hold `entry` until the earlier of `now` + the tier's TTL and `fresh_until`, unless
        the tier is not in use or a purge came since `generation` was read."""
        if not self._live or generation != self.generation:
            return
        expires = min(now + self.ttl_s, fresh_until)
        if expires <= now:
            return
        self._items[key] = (entry, expires, tuple(tags))
        self._items.move_to_end(key)
        while len(self._items) > self._max_entries:
            self._items.popitem(last=False)

    def evict(self, keys: Sequence[str], tags: Sequence[str]) -> None:
        """Forget the given keys and every entry under one of the given tags."""
        self.generation += 1
        for key in keys:
            self._items.pop(key, None)
        if tags:
            # Purges are rare and the tier is small: a scan beats keeping a tag index per put.
            doomed = set(tags)
            for key in [k for k, (_, _, t) in self._items.items() if doomed.intersection(t)]:
                del self._items[key]

    def start(self) -> None:
        """Start following purges in a background task, if there is a channel and it is not
        followed yet (needs a running loop)."""
        if self._listen is not None and self._task is None:
            self._task = asyncio.create_task(self._follow(self._listen))

    async def close(self) -> None:
        """Stop following purges and forget everything."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._go_dark()

    async def _follow(self, listen: Listen) -> None:
        """Listen for purges for as long as the process runs, subscribing again after a loss."""
        while True:
            try:
                await listen(self.evict, self._subscribed)
            except CacheUnavailable as exc:
                if self._live:
                    log.warning("near_cache_dark", error=str(exc))
            except Exception:
                # No caller to fail in a background task: a bug here is logged loudly, not lost.
                log.exception("near_cache_listener_crashed")
            # Purges may have been missed while unsubscribed: nothing held may be trusted.
            self._go_dark()
            await asyncio.sleep(self._pause)
            self._pause = min(self._pause * 2, RESUBSCRIBE_MAX_S)

    def _subscribed(self) -> None:
        self._live = True
        self._pause = RESUBSCRIBE_FIRST_S

    def _go_dark(self) -> None:
        self._live = self._listen is None
        self.generation += 1
        self._items.clear()
