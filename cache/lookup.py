"""What a fetch asks (`Ask`) and answers (`Lookup`), and the decisions over a stored entry's age
that do not depend on where it is stored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cache.entry import Entry
from cache.policy import CachePolicy, servable_stale

Compute = Callable[[], Awaitable[Entry]]


@dataclass(slots=True)
class Ask:
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


def landed(
    entry: Entry | None, policy: CachePolicy, cached: Entry | None, now: float
) -> Lookup | None:
    """Return `entry` as a fresh MISS if written since `cached` and still fresh at `now`."""
    if entry is None or (cached is not None and entry.written_at <= cached.written_at):
        return None
    age = max(0.0, now - entry.written_at)
    ttl = policy.ttl_for(entry)
    if age >= ttl:
        return None
    return Lookup(entry, "MISS", age, ttl - age, False)


def error_stale(policy: CachePolicy, cached: Entry | None, now: float) -> Lookup | None:
    """Return the stored copy as an error-stale answer if it is young enough for that at `now`."""
    if cached is None or not servable_stale(cached):
        return None
    age = max(0.0, now - cached.written_at)
    if age >= policy.ttl_for(cached) + policy.stale_if_error_s:
        return None
    return Lookup(cached, "STALE", age, 0.0, True)
