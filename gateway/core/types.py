"""The type vocabulary shared by the executor, the upstream adapters and the policies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

JSON = Any
"""A decoded JSON value: dict, list, str, int, float, bool or None."""

Outcome = Literal["ok", "not_found", "error", "timeout", "circuit_open", "overloaded", "skipped"]
"""What became of one call: `ok`, or why it has no value. The one spelling of these words: the
errors' `outcome`, `_meta.sources`, metrics labels and `/admin/sources` all use these values."""

OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
"""Every outcome, in the order they are reported."""

ASKED: frozenset[Outcome] = frozenset({"ok", "not_found", "error", "timeout"})
"""Outcomes of calls that reached their source, whose latency is the source's: `circuit_open`,
`overloaded` and `skipped` never left the gateway."""

ANSWERED: frozenset[Outcome] = frozenset({"ok", "not_found"})
"""Outcomes where the source answered as it should: their latency is what a timeout must allow."""


@dataclass(frozen=True, slots=True)
class Call:
    """One rendered request to one source, with the time it may take.

    `target` is the URL path (already percent-encoded, relative to the source's base URL) for
    HTTP sources and the SQL text for SQL sources; `params` holds query-string values for HTTP
    and bound parameters for SQL. `timeout` is seconds for one attempt; `deadline` is the
    event-loop time (`loop.time()`) by which the call, retries included, must be over.
    """

    source: str
    name: str
    target: str
    params: Mapping[str, Any]
    timeout: float
    deadline: float
    one: bool = False
    request_id: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    max_rows: int = 1000
    """SQL: the most rows the result may hold; a larger result is the call's error."""
    trace: str = ""
    """The W3C `traceparent` the call carries (HTTP header, SQL comment); "" for none."""
    tracestate: str = ""
    """The client's `tracestate`, bounded, passed on with `trace` over HTTP."""
    exported: bool = False
    """Whether this gateway exports the request's trace (its span records): a client's
    `sampled` flag alone never decides what this gateway does with its own resources."""


Source = Callable[[Call], Awaitable[JSON]]
"""An async function from a call to its decoded result; raises `SourceError` on failure."""

Policy = Callable[[Source], Source]
"""A function from source to source that adds one behaviour (timeout, retry, breaker...)."""


@dataclass(slots=True)
class Upstream:
    """A started source: the function to call it, and how to probe, measure and close it."""

    call: Source
    close: Callable[[], Awaitable[None]]
    ping: Callable[[], Awaitable[None]]
    pool_stats: Callable[[], Mapping[str, int]]
