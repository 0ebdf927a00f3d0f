"""The cache's own settings values: one endpoint's policy and the cache-wide settings, built from
the config where the runtime is assembled, so that cache/ never reads the config's models."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cache.entry import COMPRESS_MIN_BYTES, MAX_BODY_BYTES, Entry, Windows


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long one endpoint's answers are fresh, kept stale, and whether clients may bypass.

    An entry's own bounds (`Entry.max_age_s`, `Entry.shared`, from its upstreams' Cache-Control)
    shorten its freshness below the policy's, never lengthen it; an entry no shared cache may
    keep is fresh for 0 s, so never stored."""

    ttl_s: float
    partial_ttl_s: float
    stale_while_revalidate_s: float
    stale_if_error_s: float
    not_found_ttl_s: float
    allow_client_bypass: bool
    windows: Windows = field(init=False, compare=False)
    """How old a complete, a partial and a not-found entry may be and still be served without a
    fan-out (fresh, then stale while revalidating), and the stale seconds within the first two:
    what a store's `lookup` decides by (`cache.entry.servable`)."""

    def __post_init__(self) -> None:
        swr = self.stale_while_revalidate_s
        windows = (
            self.ttl_s + swr if self.ttl_s > 0 else 0.0,
            self.partial_ttl_s + swr if self.partial_ttl_s > 0 else 0.0,
            self.not_found_ttl_s,
            swr,
        )
        object.__setattr__(self, "windows", windows)

    @property
    def stores(self) -> bool:
        """Return whether any answer can ever be stored: if not, the cache is never asked."""
        return self.ttl_s > 0 or self.partial_ttl_s > 0 or self.not_found_ttl_s > 0

    def ttl_for(self, entry: Entry) -> float:
        """Return how long `entry` is fresh: 0 for answers that are never stored (5xx, or ones
        no shared cache may keep), at most its own `max_age_s`."""
        if entry.status == 200:
            ttl = self.ttl_s if entry.complete else self.partial_ttl_s
        elif entry.status == 404:
            ttl = self.not_found_ttl_s
        else:
            return 0.0
        if entry.max_age_s < ttl:
            ttl = entry.max_age_s
        if entry.no_store or entry.private:
            return 0.0
        return ttl

    def window_for(self, entry: Entry) -> float:
        """Return how old `entry` may be and still be served without a fan-out (`windows`)."""
        if entry.status == 200:
            window = self.windows[0] if entry.complete else self.windows[1]
            if entry.max_age_s != math.inf:
                cap = entry.max_age_s
                window = min(window, cap + self.stale_while_revalidate_s) if cap > 0 else 0.0
            return window
        if entry.status == 404:
            return min(self.windows[2], entry.max_age_s)
        return 0.0

    def keep_for(self, entry: Entry) -> float:
        """Return how long the backend keeps `entry`: fresh, then as long as it may serve stale."""
        ttl = self.ttl_for(entry)
        if ttl <= 0:
            return 0.0
        if not servable_stale(entry):
            return ttl
        return ttl + max(self.stale_while_revalidate_s, self.stale_if_error_s)


def servable_stale(entry: Entry) -> bool:
    """Return whether `entry` may be served past its TTL: answers (200) may, not-found ones never.

    A 404 kept through the stale windows would hide a product created meanwhile for an hour,
    and cost a backend entry per unknown id for as long.
    """
    return entry.status == 200


@dataclass(frozen=True, slots=True)
class NearSettings:
    """The near tier in front of Redis: how many entries, and for how long at most."""

    max_entries: int = 1000
    ttl_s: float = 1.0


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Where composite answers are cached (`memory://`, `redis://`, `rediss://`,
    `redis+cluster://host:port`) and the bounds of the store."""

    url: str = "memory://"
    key_prefix: str = "gw:"
    op_timeout_s: float = 0.02
    memory_max_entries: int = 10_000
    memory_max_bytes: int = 64 * 1024 * 1024
    compress_min_bytes: int = COMPRESS_MIN_BYTES
    max_entry_bytes: int = MAX_BODY_BYTES
    near: NearSettings | None = None
