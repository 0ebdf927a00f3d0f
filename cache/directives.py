"""What an upstream's `Cache-Control` says about caching the composite its answer goes into.

A call's answer may forbid storing it (`no-store`), keep it out of shared caches (`private`) or
bound how long it is fresh (`max-age`, or `s-maxage`, which wins for a shared cache as the
gateway is). The composite takes the strictest of its calls' directives. `no-cache` (store, but
revalidate before each use) is read as `max-age=0`: a composite cannot be revalidated.

Header values come from upstreams that may be hostile: they are read boundedly, and what is not
a valid directive is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_HEADER_CHARS = 1024
"""The most characters of `Cache-Control` read (all its field lines together); the rest is not."""
MAX_DIRECTIVES = 32
"""The most directives read."""
MAX_AGE_CAP_S = 2**31
"""The largest delta-seconds taken as it is (RFC 9111 1.2.2); anything larger is taken as this."""


@dataclass(frozen=True, slots=True)
class Directives:
    """An answer's caching directives: never stored, kept from shared caches, fresh at most."""

    no_store: bool = False
    private: bool = False
    max_age_s: float = math.inf

    def __and__(self, other: Directives) -> Directives:
        """Return the strictest of both: what a composite of both answers may do."""
        return Directives(
            self.no_store or other.no_store,
            self.private or other.private,
            min(self.max_age_s, other.max_age_s),
        )


@dataclass(slots=True)
class Directed:
    """A source's value with its upstream's directives, as an HTTP source returns it when they
    say something; the executor unwraps it (a plain value is the common case)."""

    value: Any
    directives: Directives


def parse_cache_control(values: Iterable[str]) -> Directives | None:
    """Return the directives of `Cache-Control` field values, or None when they say nothing
    about storing or freshness. Invalid directives (`max-age=-1`, `max-age=x`) are ignored; a
    repeated `max-age` counts at its smallest."""
    text = ""
    for value in values:
        text = f"{text},{value}" if text else value
        if len(text) >= MAX_HEADER_CHARS:
            break
    no_store = private = no_cache = False
    max_age = s_maxage = math.inf
    for part in text[:MAX_HEADER_CHARS].split(",", MAX_DIRECTIVES)[:MAX_DIRECTIVES]:
        name, _, arg = part.partition("=")
        name = name.strip().lower()
        if name == "no-store":
            no_store = True
        elif name == "private":
            private = True  # `private="Set-Cookie"` too: which fields, not ours to judge
        elif name == "no-cache":
            no_cache = True
        elif name == "max-age":
            max_age = min(max_age, _seconds(arg))
        elif name == "s-maxage":
            s_maxage = min(s_maxage, _seconds(arg))
    if s_maxage != math.inf:
        max_age = s_maxage
    if no_cache:
        max_age = 0.0
    if not (no_store or private or max_age != math.inf):
        return None
    return Directives(no_store, private, max_age)


def _seconds(arg: str) -> float:
    """Return a delta-seconds argument (quotes allowed), or inf when it is not one."""
    arg = arg.strip()
    if len(arg) >= 2 and arg[0] == arg[-1] == '"':
        arg = arg[1:-1]
    if not arg or not arg.isascii() or not arg.isdigit():
        return math.inf
    if len(arg) > 10:
        return float(MAX_AGE_CAP_S)
    return float(min(int(arg), MAX_AGE_CAP_S))


def strictest(directives: Iterable[Directives | None]) -> Directives | None:
    """Return the strictest of some directives (None: none of them said anything)."""
    out = None
    for d in directives:
        if d is not None:
            out = d if out is None else out & d
    return out
