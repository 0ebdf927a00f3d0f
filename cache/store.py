"""The seam between cache policy and cache storage: what a backend must do, and how it fails."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cache.entry import Windows


class CacheUnavailable(Exception):
    """The cache backend could not answer in time (down, slow, full); the caller goes uncached."""


class Store(Protocol):
    """Bytes under keys with an expiry, tag sets for purging, and short owner-token locks.

    Every method but `purge` and `close` is on the request path, must be bounded by the backend's
    own per-operation timeout, and raises only `CacheUnavailable` when the backend fails.
    """

    async def get(self, key: str) -> bytes | None:
        """Return the bytes stored under `key`, or None when there are none; a value longer than
        any entry the store's owner writes may come back cut, but still longer than that."""
        ...

    async def put(
        self, key: str, data: bytes, keep_s: float, tags: Sequence[str], unlock: str = ""
    ) -> None:
        """Store `data` for `keep_s` seconds, add `key` to each tag's set, and release the lock on
        `key` if `unlock` is the token that holds it."""
        ...

    async def acquire(self, key: str, token: str, hold_s: float) -> tuple[bool, bytes | None]:
        """Take the lock on `key` for `hold_s` seconds with `token` unless another token holds it;
        return whether it was taken and the bytes stored under `key` now (one round trip)."""
        ...

    async def lookup(
        self, key: str, token: str, hold_s: float, windows: Windows, now: float
    ) -> tuple[bool, bytes | None]:
        """Return the bytes stored under `key` and, unless they hold an entry that `windows` say
        may be served at `now` (`cache.entry.servable`), take the lock as `acquire` does and say
        whether it was taken; without the lock tried, False (one round trip)."""
        ...

    async def release(self, key: str, token: str) -> bool:
        """Release the lock on `key` if `token` holds it; return whether it did."""
        ...

    async def purge(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete the given keys and every key in the given tags' sets; return how many existed."""
        ...

    async def ping(self) -> None:
        """Return when the backend answers; raise `CacheUnavailable` when it does not."""
        ...

    async def close(self) -> None:
        """Release the backend's connections."""
        ...
