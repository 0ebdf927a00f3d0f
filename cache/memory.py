"""The in-process store: one process's cache, bounded by entry count and bytes, least recently
used first out."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from cache.entry import Windows, servable


class MemoryStore:
    """A `Store` in a dict: expiry by clock, LRU eviction past `max_entries` or `max_bytes`."""

    def __init__(
        self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float, tuple[str, ...]]] = OrderedDict()
        self._bytes = 0
        self._tags: dict[str, set[str]] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    @property
    def size(self) -> tuple[int, int]:
        """Return the number of entries held and their total bytes."""
        return len(self._entries), self._bytes

    async def get(self, key: str) -> bytes | None:
        """Return the bytes stored under `key`, or None when there are none (or they expired)."""
        item = self._entries.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return item[0]

    async def put(
        self, key: str, data: bytes, keep_s: float, tags: Sequence[str], unlock: str = ""
    ) -> None:
        """Store `data` for `keep_s` seconds under `key` and its tags, evicting the least used."""
        self._drop(key)
        if len(data) <= self._max_bytes:
            self._entries[key] = (data, self._clock() + keep_s, tuple(tags))
            self._bytes += len(data)
            for tag in tags:
                self._tags.setdefault(tag, set()).add(key)
            while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
                self._drop(next(iter(self._entries)))
        if unlock:
            await self.release(key, unlock)

    async def acquire(self, key: str, token: str, hold_s: float) -> tuple[bool, bytes | None]:
        """Take the lock on `key` for `hold_s` seconds unless another token holds it; return
        whether it was taken and the bytes stored under `key`."""
        held = self._locks.get(key)
        now = self._clock()
        if held is not None and held[1] > now and held[0] != token:
            return False, await self.get(key)
        self._locks[key] = (token, now + hold_s)
        return True, await self.get(key)

    async def lookup(
        self, key: str, token: str, hold_s: float, windows: Windows, now: float
    ) -> tuple[bool, bytes | None]:
        """Return the bytes stored under `key`, and whether the lock was taken: only tried when
        they are not an entry `windows` say may be served at `now`."""
        data = await self.get(key)
        if data is not None and servable(data, windows, now):
            return False, data
        return await self.acquire(key, token, hold_s)

    async def release(self, key: str, token: str) -> bool:
        """Release the lock on `key` if `token` holds it; return whether it did."""
        held = self._locks.get(key)
        if held is None or held[0] != token:
            return False
        del self._locks[key]
        return True

    async def purge(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete the given keys and every key under the given tags; return how many existed."""
        doomed = set(keys)
        for tag in tags:
            doomed |= self._tags.pop(tag, set())
        now = self._clock()
        return sum(self._drop(key) > now for key in doomed)

    async def ping(self) -> None:
        """Return at once: memory is always there."""

    async def close(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._tags.clear()
        self._locks.clear()
        self._bytes = 0

    def _drop(self, key: str) -> float:
        """Remove `key` and its tag memberships; return its expiry time, or -inf if absent."""
        item = self._entries.pop(key, None)
        if item is None:
            return float("-inf")
        data, expires, tags = item
        self._bytes -= len(data)
        for tag in tags:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]
        return expires
