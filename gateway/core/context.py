"""The one request context: made by the edge, passed to the runner, read by the access log;
with the request's W3C trace context (`traceparent`, `tracestate`), read or started."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from random import getrandbits
from typing import Any


def _in_request() -> bool:
    return True


class RequestContext:
    """One request: who asked and when, what it may spend, and what it did (the access line).

    `arrived` and `deadline` are event-loop times (`loop.time()`); `headers` are the client's,
    names in lower case, as the server gives them. The runner fills `endpoint`, `cache`,
    `complete`, `calls` and `fanout`; the edge, `disconnected`. `trace_id`, `span_id` and
    `flags` are the W3C trace context calls propagate (`begin_trace` fills them), `explain` the
    notes of `X-Gateway-Explain` when an admin asked for them, `span` the request's exported
    span (tracing with an exporter only).
    """

    __slots__ = (
        "arrived",
        "cache",
        "calls",
        "complete",
        "deadline",
        "disconnected",
        "endpoint",
        "explain",
        "fanout",
        "flags",
        "headers",
        "request_id",
        "span",
        "span_id",
        "started",
        "trace_id",
        "tracestate",
        "watch",
    )

    def __init__(self, request_id: str, arrived: float, headers: Mapping[bytes, bytes]) -> None:
        self.request_id = request_id
        self.arrived = arrived
        self.started = time.perf_counter()
        """When the request arrived by `time.perf_counter()`, for durations finer than the
        loop's clock (uvloop's moves in whole milliseconds)."""
        self.headers = headers
        self.deadline = float("inf")
        self.watch: Callable[[], bool] = _in_request
        """Called as a fan-out starts: returns whether it runs in the request's own task (a
        background refresh does not), and the edge starts watching for the client leaving."""
        self.endpoint = ""
        self.cache = ""
        self.complete: bool | None = None
        self.disconnected = False
        self.calls: dict[str, Any] = {}
        self.fanout: tuple[float, float] | None = None
        """(ms from arrival to the fan-out's start, the fan-out's ms) when one ran for it."""
        self.trace_id = ""
        self.span_id = ""
        """The span calls name as their parent: the request's own."""
        self.flags = "00"
        self.tracestate = ""
        self.explain: dict[str, Any] | None = None
        self.span: Any = None

    def traceparent(self) -> str:
        """Return the `traceparent` that names this request's span ("" without a trace)."""
        if not self.trace_id:
            return ""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def explained_calls(ctx: RequestContext) -> dict[str, dict[str, Any]]:
    """Return the per-call notes of an explained request (by call name), made on first use."""
    assert ctx.explain is not None
    calls: dict[str, dict[str, Any]] = ctx.explain.setdefault("calls", {})
    return calls


def note_of(call_name: str) -> dict[str, Any] | None:
    """Return the explain notes of one call of the current request, or None when it is not
    explained (the retry and hedge observers count into them)."""
    ctx = current.get()
    if ctx is None or ctx.explain is None:
        return None
    return explained_calls(ctx).setdefault(call_name, {})


current: ContextVar[RequestContext | None] = ContextVar("gateway_request", default=None)
"""The request being served, bound once by the access log and inherited by every task it
starts, so that any log line of its fan-out carries its request id."""


_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
MAX_TRACESTATE_CHARS = 512
MAX_TRACESTATE_MEMBERS = 32
# W3C trace-context: a key (lower case, or tenant@system) '=' a value of printable ASCII but ','
# and '=', no trailing space.
_MEMBER = re.compile(
    rb"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


def new_trace_id() -> str:
    """Return a random W3C trace id: 32 lower-case hex digits, never all zeros."""
    return f"{getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    """Return a random W3C span id: 16 lower-case hex digits, never all zeros."""
    return f"{getrandbits(64) or 1:016x}"


def begin_trace(ctx: RequestContext) -> None:
    """Set the request's trace context: the client's `traceparent` when it is a valid version
    00 one (its `tracestate` kept when within bounds), else a new trace; a new span id always.

    Only validated hex reaches `trace_id`, `span_id` and `flags`: they end up in SQL comments.
    """
    headers = ctx.headers
    raw = headers.get(b"traceparent")
    found = None if raw is None else _TRACEPARENT.fullmatch(raw)
    if found is None or found[1] == _ZERO_TRACE or found[2] == _ZERO_SPAN:
        ctx.trace_id = new_trace_id()
    else:
        ctx.trace_id = found[1].decode()
        # Of version 00's flags only `sampled` means anything to us: the rest are not passed on.
        ctx.flags = "01" if int(found[3], 16) & 1 else "00"
        state = headers.get(b"tracestate")
        if state:
            ctx.tracestate = bounded_tracestate(state)
    ctx.span_id = new_span_id()


def parent_span_id(ctx: RequestContext) -> str:
    """Return the client's span id (the request span's parent), or "" when it sent none."""
    raw = ctx.headers.get(b"traceparent")
    found = None if raw is None else _TRACEPARENT.fullmatch(raw)
    if found is None or found[1].decode() != ctx.trace_id or found[2] == _ZERO_SPAN:
        return ""
    return found[2].decode()


def bounded_tracestate(value: bytes) -> str:
    """Return a client's `tracestate` when well formed and within 512 characters and 32
    members, else "" (dropped whole: W3C allows no partial repair we could trust)."""
    if len(value) > MAX_TRACESTATE_CHARS:
        return ""
    members = [m.strip(b" \t") for m in value.split(b",")]
    members = [m for m in members if m]
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return ""
    if not all(_MEMBER.fullmatch(m) for m in members):
        return ""
    return b",".join(members).decode("ascii")


_SQL_SAFE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def sql_comment(traceparent: str) -> str:
    """Return the comment that carries `traceparent` in a query's text ("" for anything that
    is not a well-formed traceparent: only validated hex ever reaches SQL)."""
    if not _SQL_SAFE.fullmatch(traceparent):
        return ""
    return f"/* traceparent='{traceparent}' */ "
