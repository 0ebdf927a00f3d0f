"""An endpoint compiled to a runner: typed parameters in, a status, headers and bytes out.

The runner owns everything between the edge and the wire: the cache lookup, the fan-out, the
merge, the encoding, the entry it stores, and the headers of the answer.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError
from starlette.types import Scope

from cache.composite import CompositeCache, Lookup
from cache.entry import Entry, make_entry
from cache.keys import composite_key
from cache.memory import MemoryStore
from cache.policy import CachePolicy
from gateway.core.context import RequestContext, parent_span_id
from gateway.core.executor import Composite, execute
from gateway.core.merge import answer, with_stale_age
from gateway.core.plan import PERSONAL_HEADERS, EndpointPlan, ParamPlan
from gateway.core.types import Source
from upstreams.breaker import Breaker

if TYPE_CHECKING:
    from gateway.ops.tracing import Tracing

JSON_TYPE = (b"content-type", b"application/json")

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]
"""A response as the edge sends it: status, headers (without content-length) and body."""

Observe = Callable[[EndpointPlan, Composite], None]
"""Told about every fan-out that ran, background refreshes included (metrics and statistics)."""

EXPLAIN = b"x-gateway-explain"


@dataclass(frozen=True, slots=True)
class Seeing:
    """How one request can be seen: its spans exported (`tracing`, None when not), and its
    `_explain` shown to whoever brings the admin token (`token`, None without admin)."""

    tracing: Tracing | None = None
    token: bytes | None = None
    breakers: Mapping[str, Breaker | None] = field(default_factory=dict)

    def may_explain(self, ctx: RequestContext) -> None:
        """Start `ctx`'s explain notes when it asks with `X-Gateway-Explain: 1` and the admin
        token (`Authorization: Bearer ...`); anything else is ignored, without an error."""
        if self.token is None or ctx.headers.get(EXPLAIN, b"").strip() != b"1":
            return
        scheme, _, given = ctx.headers.get(b"authorization", b"").partition(b" ")
        # compare_digest: how long the comparison takes says nothing about the token.
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            ctx.explain = {}

    def begin(self, ctx: RequestContext) -> None:
        """Start the request's span, when traces are exported."""
        if self.tracing is not None:
            self.tracing.begin(ctx, parent_span_id(ctx), ctx.endpoint)

    def end(self, ctx: RequestContext, status: int | None) -> None:
        """End the request's span, when traces are exported."""
        if self.tracing is not None:
            self.tracing.end(ctx, status)


def parse_value(p: ParamPlan, text: str, loc: list[Any]) -> tuple[Any, list[Any]]:
    """Return one typed parameter, or FastAPI-shaped validation errors located at `loc`."""
    if p.type == "int" and 0 < len(text) <= 18 and text.isascii() and text.isdigit():
        # Most ids: at most 18 ASCII digits is an int inside every bound, as validated.
        return int(text), []
    try:
        return p.adapter.validate_python(text), []
    except ValidationError as exc:
        return None, [
            {"type": e["type"], "loc": loc, "msg": e["msg"], "input": text}
            for e in exc.errors(include_url=False)
        ]


def parse_params(plan: EndpointPlan, raw: Mapping[str, str]) -> tuple[dict[str, Any], list[Any]]:
    """Return typed path parameters, or FastAPI-shaped validation errors for the bad ones."""
    values: dict[str, Any] = {}
    errors: list[Any] = []
    for p in plan.params:
        value, problems = parse_value(p, raw.get(p.name, ""), ["path", p.name])
        if problems:
            errors += problems
        else:
            values[p.name] = value
    return values, errors


class Runner:
    """One endpoint, compiled when the config loads; called once per request."""

    def __init__(
        self,
        plan: EndpointPlan,
        sources: Mapping[str, Source],
        cache: CompositeCache,
        policy: CachePolicy | None,
        key_prefix: str,
        observe: Observe,
        seeing: Seeing | None = None,
    ) -> None:
        self.plan = plan
        self.seeing = seeing or Seeing()
        self.sources = sources
        # An endpoint whose answers can never be stored is served uncached (BYPASS), the
        # cache never asked: `policy` is None then.
        self.cache = cache
        self.policy = policy
        self.key_prefix = key_prefix
        self.observe = observe
        self.deadline = plan.deadline
        self.reserve = plan.cache_reserve if policy is not None else 0.0
        self.names = tuple(p.name for p in plan.params)
        # Header names are not identifiers, so they cannot collide with a parameter.
        self.vary_keys = tuple((f"header:{h.decode()}", h) for h in plan.vary)
        self.vary = b", ".join(plan.vary)
        self.bypassable = policy is not None and policy.allow_client_bypass
        # An answer built from who is asking (a forwarded Authorization or Cookie, cached or
        # not, or a cache key varied by one) is for that client's own cache only.
        personal = plan.personal or not PERSONAL_HEADERS.isdisjoint(plan.vary)
        self.cache_scope = b"private, max-age=" if personal else b"public, max-age="
        self.call_sources = {cp.name: cp.source for cp in plan.calls}
        self.tier = "memory" if isinstance(cache.store, MemoryStore) else "redis"

    def parse(self, scope: Scope) -> tuple[dict[str, Any], list[Any]]:
        """Return a request's typed parameters, or its validation errors (a 422)."""
        return parse_params(self.plan, scope.get("path_params", {}))

    async def __call__(self, ctx: RequestContext, params: Mapping[str, Any]) -> Reply:
        """Answer one request: from the cache, or from a fan-out run (once per key) for it."""
        ctx.endpoint = self.plan.id
        seeing = self.seeing
        if EXPLAIN in ctx.headers:
            seeing.may_explain(ctx)
        if seeing.tracing is None:
            return await self.answer(ctx, params)
        seeing.begin(ctx)
        status = None
        try:
            reply = await self.answer(ctx, params)
            status = reply[0]
            return reply
        finally:
            seeing.end(ctx, status)

    async def answer(self, ctx: RequestContext, params: Mapping[str, Any]) -> Reply:
        """Return the answer to one request, `_explain` in it when `ctx` is explained."""
        # The deadline caps everything the client waits for: cache reads, waits for another
        # request's fan-out, the fan-out, and the cache write after it (`reserve`).
        ctx.deadline = deadline = ctx.arrived + self.deadline
        fresh: list[Composite] = []
        seen = ctx.explain is not None or ctx.span is not None
        computed: list[float] = []

        async def compute() -> Entry:
            if not seen:
                return await self.compute(ctx, params, fresh)
            loop = asyncio.get_running_loop()
            computed.append(loop.time())
            try:
                return await self.compute(ctx, params, fresh)
            finally:
                computed.append(loop.time())

        if self.policy is None:
            lookup = Lookup(await compute(), "BYPASS", 0.0, 0.0, False)
        elif not seen:
            lookup = await self.fetch(ctx, params, compute, deadline)
        else:
            lookup = await self._seen_fetch(ctx, params, compute, deadline, computed)
        ctx.cache = lookup.state
        ctx.complete = lookup.entry.complete
        if fresh:
            # One pass over the calls for the access line and the Server-Timing header.
            calls: dict[str, Any] = {}
            parts = []
            for n, r in fresh[0].results.items():
                if r.outcome == "ok":
                    calls[n] = {"outcome": r.outcome, "ms": round(r.ms, 1)}
                    desc = ""
                else:
                    calls[n] = {"outcome": r.outcome, "ms": round(r.ms, 1), "reason": r.detail}
                    desc = f';desc="{r.outcome}"'
                parts.append(f"{n}{desc};dur={r.ms:.1f}")
            ctx.calls = calls
            timing = ", ".join(parts).encode()
        else:
            timing = f'cache;desc="{lookup.state}"'.encode()
        if ctx.explain is not None:
            return self._explained(ctx, lookup, timing, fresh)
        return self._reply(lookup, timing, ctx.headers.get(b"if-none-match"))

    async def _seen_fetch(
        self,
        ctx: RequestContext,
        params: Mapping[str, Any],
        compute: Callable[[], Any],
        deadline: float,
        computed: list[float],
    ) -> Lookup:
        """`fetch`, noting for explain and traces which key, which tier and when."""
        cache = self.cache
        key = self.key(ctx, params)
        near = cache.near is not None and cache.near.get(key, time.time()) is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        lookup = await self.fetch(ctx, params, compute, deadline)
        ended = loop.time()
        tier = None
        if lookup.state != "BYPASS":
            tier = "near" if near and lookup.state == "HIT" else self.tier
        if ctx.explain is not None:
            ctx.explain["cache"] = {
                "key": key,
                "state": lookup.state,
                "tier": tier,
                "age_s": round(lookup.age_s, 3),
            }
        tracing = self.seeing.tracing
        if tracing is not None:
            noted = {"gateway.cache.key": key, "gateway.cache.state": lookup.state}
            if tier is not None:
                noted["gateway.cache.tier"] = tier
            # A miss looked up until its fan-out began, and stored once it ended.
            looked = computed[0] if computed else ended
            tracing.cache_span(ctx, "lookup", began, looked, noted)
            if len(computed) == 2 and lookup.state in ("MISS", "BYPASS"):
                tracing.cache_span(ctx, "store", computed[1], ended, {"gateway.cache.key": key})
        return lookup

    def _explained(
        self, ctx: RequestContext, lookup: Lookup, timing: bytes, fresh: Sequence[Composite]
    ) -> Reply:
        """Return the answer with `_explain` spliced into its copy (never into what is stored),
        and marked no-store: it is this one request's."""
        assert ctx.explain is not None
        status, headers, body = self._reply(lookup, timing, None)
        explain = explanation(
            ctx, self.deadline, self.reserve, fresh, self.call_sources, self.seeing.breakers
        )
        return status, no_store(headers), with_explain(body, explain)

    async def compute(
        self, ctx: RequestContext, params: Mapping[str, Any], fresh: list[Composite]
    ) -> Entry:
        """Run the fan-out for `params` and return its entry; `fresh` gets its composite."""
        # A background refresh has no client waiting: it gets a whole deadline of its own.
        in_request = ctx.watch()
        loop = asyncio.get_running_loop()
        began = loop.time()
        ends = ctx.deadline - self.reserve if in_request else began + self.deadline
        composite = await execute(self.plan, self.sources, params, ctx, ends)
        if in_request:
            # When the fan-out began and how long it took: the rest of the request's time
            # went to the cache, waits for another fan-out and the answer's own work.
            ctx.fanout = (
                round((began - ctx.arrived) * 1000, 1),
                round((loop.time() - began) * 1000, 1),
            )
        composite, status, body = answer(self.plan, composite)
        fresh.append(composite)
        self.observe(self.plan, composite)  # here, so background refreshes count too
        return make_entry(status, body, status == 200 and composite.complete, composite.directives)

    async def fetch(
        self,
        ctx: RequestContext,
        params: Mapping[str, Any],
        compute: Callable[[], Any],
        deadline: float,
    ) -> Lookup:
        """Return the cached answer for `params` (the request's headers in `vary` included),
        or the one `compute` makes, under the cache's single-flight and stale rules."""
        policy = self.policy
        assert policy is not None
        key = self.key(ctx, params)
        tags = [t.render_value(params) for t in self.plan.tags]
        # Directive names are case-insensitive (RFC 9111 5.2): `No-Cache` asks the same.
        bypass = self.bypassable and b"no-cache" in ctx.headers.get(b"cache-control", b"").lower()
        return await self.cache.fetch(key, tags, policy, compute, deadline=deadline, bypass=bypass)

    def key(self, ctx: RequestContext, params: Mapping[str, Any]) -> str:
        """Return the cache key of `params` (the request's headers in `vary` included)."""
        pairs: Sequence[tuple[str, object]] = [(n, params[n]) for n in self.names]
        if self.vary_keys:
            headers = ctx.headers
            pairs = [
                *pairs,
                *((k, headers.get(h, b"").decode("latin-1")) for k, h in self.vary_keys),
            ]
        return composite_key(self.key_prefix, self.plan.id, self.plan.digest, pairs)

    def _reply(self, lookup: Lookup, timing: bytes, if_none_match: bytes | None) -> Reply:
        entry = lookup.entry
        body = entry.body
        if lookup.error_stale:
            body = with_stale_age(body, lookup.age_s)
        if entry.status != 200 or not entry.complete or lookup.error_stale or entry.no_store:
            cache_control = b"no-store"
        elif entry.private:
            # Never stored here (nor in any shared cache), but the client's own cache may keep
            # it as long as the gateway would have.
            ttl = 0.0 if self.policy is None else min(self.policy.ttl_s, entry.max_age_s)
            cache_control = b"private, max-age=" + str(int(ttl)).encode()
        else:
            cache_control = self.cache_scope + str(int(lookup.fresh_for_s)).encode()
        headers = [
            JSON_TYPE,
            (b"x-gateway-complete", b"true" if entry.complete else b"false"),
            (b"x-cache", lookup.state.encode()),
            (b"cache-control", cache_control),
            (b"server-timing", timing),
        ]
        if self.vary:
            headers.append((b"vary", self.vary))
        if body is entry.body and entry.etag:
            etag = entry.etag.encode()
            headers.append((b"etag", etag))
            if (
                entry.status == 200
                and if_none_match is not None
                and _etag_matches(if_none_match, etag)
            ):
                return 304, headers[1:], b""
        return entry.status, headers, body


def _etag_matches(header: bytes, etag: bytes) -> bool:
    if header.strip() == b"*":
        return True
    return any(t.strip().removeprefix(b"W/") == etag for t in header.split(b","))


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


def runners(
    plans: Mapping[str, EndpointPlan],
    sources: Mapping[str, Source],
    cache: CompositeCache,
    key_prefix: str,
    observe: Observe,
    seeing: Seeing | None = None,
) -> dict[str, Runner]:
    """Return one runner per endpoint plan but listings, by endpoint id."""
    return {
        pid: Runner(
            plan,
            sources,
            cache,
            plan.cache if plan.cache is not None and plan.cache.stores else None,
            key_prefix,
            observe,
            seeing,
        )
        for pid, plan in plans.items()
        if plan.listing is None
    }
