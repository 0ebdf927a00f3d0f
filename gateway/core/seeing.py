"""How one request can be seen: its spans, when traces are exported (`Tracer`, implemented by
`gateway.ops.tracing`), and its `_explain`, shown to whoever brings the admin token."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway.core.context import RequestContext, parent_span_id
from gateway.core.executor import Composite
from upstreams.breaker import Breaker

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]
"""A response as the edge sends it: status, headers (without content-length) and body."""

Answer = Callable[[RequestContext, Mapping[str, Any]], Awaitable[Reply]]


def bearer_ok(given: bytes, token: bytes) -> bool:
    """Whether a presented credential (surrounding whitespace ignored) is the admin token, the
    one check of the admin API and of explain; compare_digest: how long the comparison takes
    says nothing about the token."""
    return hmac.compare_digest(given.strip(), token)


class Tracer(Protocol):
    """What the request path asks of an exporting tracer (`gateway.ops.tracing.Tracing`)."""

    def begin(self, ctx: RequestContext, parent_id: str, name: str) -> None: ...
    def end(self, ctx: RequestContext, status: int | None) -> None: ...
    def cache_span(
        self,
        ctx: RequestContext,
        operation: str,
        started: float,
        ended: float,
        attributes: Mapping[str, Any],
    ) -> None: ...


EXPLAIN = b"x-gateway-explain"


@dataclass(frozen=True, slots=True)
class Seeing:
    """How one request can be seen: its spans exported (`tracing`, None when not), and its
    `_explain` shown to whoever brings the admin token (`token`, None without admin)."""

    tracing: Tracer | None = None
    token: bytes | None = None
    breakers: Mapping[str, Breaker | None] = field(default_factory=dict)

    def may_explain(self, ctx: RequestContext) -> None:
        """Start `ctx`'s explain notes when it asks with `X-Gateway-Explain: 1` and the admin
        token (`Authorization: Bearer ...`); anything else is ignored, without an error."""
        if self.token is None or ctx.headers.get(EXPLAIN, b"").strip() != b"1":
            return
        scheme, _, given = ctx.headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and bearer_ok(given, self.token):
            ctx.explain = {}

    async def serve(self, ctx: RequestContext, params: Mapping[str, Any], answer: Answer) -> Reply:
        """Return `answer`'s reply, explained when `ctx` asks for it with the token, and inside
        the request's span when traces are exported."""
        if EXPLAIN in ctx.headers:
            self.may_explain(ctx)
        if self.tracing is None:
            return await answer(ctx, params)
        self.begin(ctx)
        status = None
        try:
            reply = await answer(ctx, params)
            status = reply[0]
            return reply
        finally:
            self.end(ctx, status)

    def begin(self, ctx: RequestContext) -> None:
        """Start the request's span, when traces are exported."""
        if self.tracing is not None:
            self.tracing.begin(ctx, parent_span_id(ctx), ctx.endpoint)

    def end(self, ctx: RequestContext, status: int | None) -> None:
        """End the request's span, when traces are exported."""
        if self.tracing is not None:
            self.tracing.end(ctx, status)


def explanation(
    ctx: RequestContext,
    deadline_s: float,
    reserve_s: float,
    fresh: Sequence[Composite],
    sources: Mapping[str, str],
    breakers: Mapping[str, Breaker | None],
) -> dict[str, Any]:
    """Return the `_explain` of one answered request: its cache key and state, its budget,
    and per call of the fan-out it ran (none when served from the cache or another request's
    fan-out): start and end (ms from arrival), attempts, hedges, breaker, outcome, reason."""
    assert ctx.explain is not None
    notes = ctx.explain
    spent = (asyncio.get_running_loop().time() - ctx.arrived) * 1000
    out: dict[str, Any] = {
        "cache": notes.get("cache", {"state": ctx.cache, "tier": None}),
        "budget": {
            "deadline_ms": round(deadline_s * 1000, 1),
            "cache_reserve_ms": round(reserve_s * 1000, 1),
            "spent_ms": round(spent, 1),
        },
        "trace_id": ctx.trace_id,
        "fanout": None,
        "calls": {},
    }
    if not fresh:
        return out
    out["fanout"] = {"start_ms": ctx.fanout[0], "ms": ctx.fanout[1]} if ctx.fanout else {}
    timings = notes.get("calls", {})
    calls = out["calls"]
    for name, result in fresh[0].results.items():
        note = timings.get(name, {})
        asked = result.outcome not in ("skipped", "circuit_open")
        call: dict[str, Any] = {
            "start_ms": note.get("start_ms"),
            "end_ms": note.get("end_ms"),
            "attempts": note.get("attempts", 1) if asked else 0,
            "hedges": note.get("hedges", 0),
            "outcome": result.outcome,
        }
        if result.outcome != "ok":
            call["reason"] = result.detail
        if result.outcome == "circuit_open":
            call["breaker"] = "refused (open)"
        elif asked:
            breaker = breakers.get(sources.get(name, ""))
            # The state now, just after the call: the one it was let through in, or its result.
            call["breaker"] = "none" if breaker is None else f"passed ({breaker.state})"
        calls[name] = call
    return out


def with_explain(body: bytes, explain: Mapping[str, Any]) -> bytes:
    """Return a JSON object's bytes with `_explain` added last, without decoding it."""
    if not (body.startswith(b"{") and body.endswith(b"}")):
        return body
    inner = body[1:-1].strip()
    sep = b"," if inner else b""
    return b"{" + inner + sep + b'"_explain":' + orjson.dumps(explain, default=str) + b"}"


def no_store(headers: Headers) -> Headers:
    """Return an explained answer's headers: never stored anywhere, no ETag (its body is not
    the entry's)."""
    kept = [(n, v) for n, v in headers if n not in (b"cache-control", b"etag")]
    return [*kept, (b"cache-control", b"no-store")]
