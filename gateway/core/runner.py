"""An endpoint compiled to a runner: typed parameters in, a status, headers and bytes out.

The runner owns everything between the edge and the wire: the cache lookup, the fan-out, the
merge, the encoding, the entry it stores, and the headers of the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from starlette.types import Scope

from cache.composite import CompositeCache, Lookup
from cache.entry import Entry, make_entry
from cache.keys import composite_key
from cache.memory import MemoryStore
from cache.policy import CachePolicy
from gateway.core.context import RequestContext
from gateway.core.executor import Composite, execute
from gateway.core.merge import answer, with_stale_age
from gateway.core.plan import PERSONAL_HEADERS, EndpointPlan, ParamPlan
from gateway.core.seeing import Reply, Seeing, explanation, no_store, with_explain
from gateway.core.types import Source

JSON_TYPE = (b"content-type", b"application/json")


Observe = Callable[[EndpointPlan, Composite], None]
"""Told about every fan-out that ran, background refreshes included (metrics and statistics)."""


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
        return await self.seeing.serve(ctx, params, self.answer)

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
        began = time.perf_counter()
        loop_now = asyncio.get_running_loop().time()
        ends = ctx.deadline - self.reserve if in_request else loop_now + self.deadline
        composite = await execute(self.plan, self.sources, params, ctx, ends)
        if in_request:
            # When the fan-out began and how long it took: the rest of the request's time
            # went to the cache, waits for another fan-out and the answer's own work. Timed
            # with perf_counter: uvloop's loop.time() moves in whole milliseconds.
            ctx.fanout = (
                round((began - ctx.started) * 1000, 1),
                round((time.perf_counter() - began) * 1000, 1),
            )
        # Observed here, so background refreshes count too.
        return finish(self.plan, composite, fresh, self.observe)

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
                and etag_matches(if_none_match, etag)
            ):
                return 304, headers[1:], b""
        return entry.status, headers, body


def finish(
    plan: EndpointPlan, composite: Composite, fresh: list[Composite], observe: Observe
) -> Entry:
    """Return the entry of a fan-out that ran: its answer encoded once, the composite kept in
    `fresh` (the access line, explain) and told to `observe` (metrics, statistics)."""
    composite, status, body = answer(plan, composite)
    fresh.append(composite)
    observe(plan, composite)
    return make_entry(status, body, status == 200 and composite.complete, composite.directives)


def etag_matches(header: bytes, etag: bytes) -> bool:
    """Whether an If-None-Match header names `etag` (or is `*`), weak or strong."""
    if header.strip() == b"*":
        return True
    return any(t.strip().removeprefix(b"W/") == etag for t in header.split(b","))


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
