"""Config -> plans: everything a request needs, computed once when the config loads."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import jsonschema_rs
import orjson
from pydantic import Field, TypeAdapter

from cache.policy import CachePolicy
from gateway.config import results
from gateway.config.calls import BatchRender, Render
from gateway.config.kinds import Kind, SourceConfig, kind_of
from gateway.config.schema import (
    CacheConfig,
    CallConfig,
    EndpointCache,
    EndpointConfig,
    GatewayConfig,
    PropagationConfig,
    ShapeField,
)
from gateway.core import templates
from gateway.core.types import Policy, Source, Upstream
from upstreams import policies
from upstreams.breaker import Breaker, BreakerSettings, OnChange
from upstreams.http import Propagation
from upstreams.latency import Latency

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""The range of `int` path parameters: what every database binds (SQLite's INTEGER is 64-bit)."""
MAX_SEGMENT = 256
"""The most characters a `str` path parameter may have (after percent-decoding)."""

# Checked when a request's parameters are parsed, before any I/O: a value no source could take
# (an int past 64 bits, `nan`, `inf`, `1e309`) is the client's 422, not every source's error.
_PARAM_TYPES: dict[str, Any] = {
    "int": Annotated[int, Field(ge=INT_MIN, le=INT_MAX)],
    "str": Annotated[str, Field(max_length=MAX_SEGMENT)],
    "float": Annotated[float, Field(allow_inf_nan=False)],
}


@dataclass(frozen=True, slots=True)
class ParamPlan:
    """One typed path parameter and the validator that parses and bounds it."""

    name: str
    type: str
    adapter: TypeAdapter[Any]


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """How a call asks for many items at once: its renderer, the field that names each
    element's item, and the most ids one request carries."""

    render: BatchRender
    key: str
    max: int
    rows: bool
    """Whether each item's value is the list of its elements (a sql call without `one`), rather
    than its first element."""
    timeout: float | None = None
    """Seconds one batch request may take; None: the call's own timeout."""


@dataclass(frozen=True, slots=True)
class ListingPlan:
    """Where a listing's ids come from, and the item endpoint that builds each of its items."""

    item: str
    """The item endpoint's id (`GET /products/{id:int}`)."""
    max: int
    query: str | None = None
    """The query parameter that holds the ids, comma-separated."""
    call: str | None = None
    field: str | None = None


@dataclass(frozen=True, slots=True)
class ShapedField:
    """One field of a shaped document: the call it reads, the path into its value (a list
    index is an int), and its default when the path finds nothing (none: left out)."""

    name: str
    call: str
    path: tuple[str | int, ...]
    has_default: bool
    default: Any


@dataclass(frozen=True, slots=True)
class CallPlan:
    """One call, ready to run: what it waits for, how it renders, what it falls back to."""

    name: str
    source: str
    deps: tuple[str, ...]
    render: Render
    timeout: float
    one: bool
    required: bool
    fallback: Any
    omit: bool
    select: tuple[str, ...] | None
    task_name: str
    forward: tuple[tuple[bytes, str], ...] = ()
    """Request headers copied to the call: (lower-case name as the server gives it, name)."""
    batch: BatchPlan | None = None
    """How a listing asks for this call's results of many items at once, if it can."""
    max_rows: int = 1000
    ignore_upstream_cache_control: bool = False
    result_schema: Mapping[str, Any] | None = None
    """The JSON Schema of the value this call puts in the document (`results.result_schema`)."""
    validator: jsonschema_rs.Validator | None = None
    """With `validate`: the compiled (narrowed, not nullable) schema each result must meet."""


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    """One endpoint, ready to serve: parameters, calls in declared order, cache settings."""

    id: str
    path: str
    route_path: str
    params: tuple[ParamPlan, ...]
    deadline: float
    calls: tuple[CallPlan, ...]
    cache: CachePolicy | None
    """How long answers are kept; None when the endpoint has no `cache:`."""
    digest: str
    tags: tuple[templates.Template, ...]
    awaited: frozenset[str]
    """Names of the calls that another call waits for."""
    vary: tuple[bytes, ...] = ()
    """Request headers (lower case) that are part of the cache key."""
    personal: bool = False
    """Whether a call forwards Authorization or Cookie: the answer is that client's alone."""
    cache_reserve: float = 0.0
    """Seconds kept from the deadline for the cache write after the fan-out (0 uncached)."""
    listing: ListingPlan | None = None
    """Set on a listing: where its ids come from and which endpoint builds its items."""
    shape: tuple[ShapedField, ...] | None = None
    """The document's fields, when the endpoint declares `shape`."""


@dataclass(frozen=True, slots=True)
class HedgeSettings:
    """When a hedge is sent: after a fixed delay, or after a live latency percentile."""

    after_s: float = 0.0
    quantile: float | None = None


@dataclass(frozen=True, slots=True)
class SourcePlan:
    """One source, compiled: its kind's row, its adapter's settings, and its policies'."""

    name: str
    kind: Kind
    settings: Any
    timeout_ms: int
    retry: policies.RetrySettings | None = None
    breaker: BreakerSettings | None = None
    max_in_flight: int | None = None
    hedge: HedgeSettings | None = None


def compile_source(
    name: str, cfg: SourceConfig, propagation: PropagationConfig | None = None
) -> SourcePlan:
    """Return the plan of one validated source: plain frozen values, no config model left."""
    kind = kind_of(cfg)
    prop = Propagation()
    if propagation is not None:
        prop = Propagation(propagation.request_id_header, propagation.deadline_header)
    retry = cfg.retry
    breaker = cfg.breaker
    hedge = cfg.hedge
    return SourcePlan(
        name=name,
        kind=kind,
        settings=kind.compile(cfg, prop),
        timeout_ms=cfg.timeout_ms,
        retry=None if retry is None else policies.RetrySettings(**retry.model_dump()),
        breaker=None if breaker is None else BreakerSettings(**breaker.model_dump()),
        max_in_flight=cfg.max_in_flight,
        hedge=None
        if hedge is None
        else HedgeSettings((hedge.after_ms or 0) / 1000, hedge.quantile),
    )


PERSONAL_HEADERS = frozenset({b"authorization", b"cookie"})
"""Request headers that say who is asking: an answer built from one is that client's alone."""


def cache_policy(cfg: EndpointCache) -> CachePolicy:
    """Return the cache policy an endpoint's `cache:` block describes."""
    return CachePolicy(
        ttl_s=float(cfg.ttl_s),
        partial_ttl_s=float(cfg.partial_ttl_s),
        stale_while_revalidate_s=float(cfg.stale_while_revalidate_s),
        stale_if_error_s=float(cfg.stale_if_error_s),
        not_found_ttl_s=float(cfg.not_found_ttl_s),
        allow_client_bypass=cfg.allow_client_bypass,
    )


def build_plans(config: GatewayConfig) -> tuple[EndpointPlan, ...]:
    """Return one plan per endpoint of a validated config."""
    return tuple(build_plan(ep, config.sources, config.cache) for ep in config.endpoints)


def build_plan(
    ep: EndpointConfig, sources: Mapping[str, SourceConfig], cache: CacheConfig | None = None
) -> EndpointPlan:
    """Return the plan of one endpoint; its digest changes whenever anything that shapes it does."""
    params = tuple(
        ParamPlan(name, kind, TypeAdapter(_PARAM_TYPES[kind]))
        for name, kind in templates.path_params(ep.path)
    )
    calls = tuple(
        _call_plan(name, call, sources[call.source], ep) for name, call in ep.calls.items()
    )
    shape = {
        "endpoint": ep.model_dump(mode="json"),
        "sources": {
            name: kind_of(sources[name]).shape(sources[name])
            for name in sorted({c.source for c in ep.calls.values()})
        },
    }
    digest = hashlib.blake2b(
        orjson.dumps(shape, option=orjson.OPT_SORT_KEYS), digest_size=6
    ).hexdigest()
    tags = tuple(templates.parse(t) for t in (ep.cache.tags if ep.cache else ()))
    listing = None
    if ep.listing is not None:
        ids = ep.listing.ids
        listing = ListingPlan(f"GET {ep.listing.item}", ids.max, ids.query, ids.call, ids.field)
    return EndpointPlan(
        id=f"GET {ep.path}",
        path=ep.path,
        route_path=templates.starlette_path(ep.path),
        params=params,
        deadline=ep.deadline_ms / 1000,
        calls=calls,
        cache=cache_policy(ep.cache) if ep.cache else None,
        digest=digest,
        tags=tags,
        awaited=frozenset(d for cp in calls for d in cp.deps),
        vary=tuple(h.lower().encode("latin-1") for h in (ep.cache.vary if ep.cache else ())),
        personal=any(raw in PERSONAL_HEADERS for cp in calls for raw, _ in cp.forward),
        cache_reserve=(cache or CacheConfig()).op_timeout_ms / 1000 if ep.cache else 0.0,
        listing=listing,
        shape=None if ep.shape is None else tuple(_shaped(n, f) for n, f in ep.shape.items()),
    )


def _shaped(name: str, spec: str | ShapeField) -> ShapedField:
    call, steps = results.shape_path(spec if isinstance(spec, str) else spec.from_)
    if isinstance(spec, str):
        return ShapedField(name, call, steps, False, None)
    return ShapedField(name, call, steps, spec.has_default, spec.default)


def _call_plan(name: str, call: CallConfig, source: SourceConfig, ep: EndpointConfig) -> CallPlan:
    deps: set[str] = set()
    kind = kind_of(source)
    render = kind.render(call)
    for text in kind.texts(call):
        deps.update(r.root for r in templates.parse(text).refs if r.root in ep.calls)
    batch = None
    if call.batch is not None:
        (param, _), *_ = templates.path_params(ep.path)
        batch = BatchPlan(
            kind.render_batch(call.batch, param),
            call.batch.key,
            call.batch.max,
            rows=kind.kind == "sql" and not call.one,
            timeout=None
            if call.batch.timeout_ms is None
            else min(call.batch.timeout_ms, ep.deadline_ms) / 1000,
        )
    return CallPlan(
        name=name,
        source=call.source,
        deps=tuple(sorted(deps)),
        render=render,
        timeout=min(call.timeout_ms or source.timeout_ms, ep.deadline_ms) / 1000,
        one=call.one,
        required=call.required,
        fallback=None if call.omit else call.fallback,
        omit=call.omit,
        select=call.select,
        task_name=f"call:{name}",
        forward=tuple((h.lower().encode("latin-1"), h) for h in call.forward_headers),
        batch=batch,
        max_rows=call.max_rows,
        ignore_upstream_cache_control=call.ignore_upstream_cache_control,
        result_schema=results.result_schema(call),
        validator=results.validator(call, ep),
    )


async def open_upstream(
    name: str, cfg: SourceConfig | SourcePlan, propagation: PropagationConfig | None = None
) -> Upstream:
    """Start the adapter of one source (its pool or client session), per its kind's row."""
    plan = cfg if isinstance(cfg, SourcePlan) else compile_source(name, cfg, propagation)
    return await plan.kind.open(name, plan.settings)


@dataclass(frozen=True, slots=True)
class Guarded:
    """A source wrapped in its policies, with the stateful ones kept for operators to read."""

    call: Source
    breaker: Breaker | None
    retry: policies.Retry | None
    limit: policies.Limit | None
    hedge: policies.Hedge | None = None
    latency: Latency | None = None


def guard(
    name: str,
    cfg: SourceConfig | SourcePlan,
    upstream: Upstream,
    *,
    on_change: OnChange | None = None,
    on_retry: policies.OnRetry | None = None,
    on_hedge: policies.OnHedge | None = None,
    traced: tuple[Policy, Policy] | None = None,
) -> Guarded:
    """Return `upstream` wrapped in its policies, always in this order, outermost first:

        breaker(retry(hedge(timeout(limit(source)))))

    - the bulkhead (limit) is innermost, so a call it refuses costs nothing and it counts what
      really goes to the source, hedges included;
    - the timeout covers one attempt, pool waits and the bulkhead included;
    - hedging sits outside the timeout, so each of its two requests gets a whole attempt's time,
      and the first success wins;
    - retry sits outside hedging: a retry is a fresh (possibly hedged) attempt, started only when
      the deadline can hold it; retries and hedges spend one `Budget` per source, so together
      they stay a small share of its calls and an outage is never multiplied;
    - the breaker is outermost: it sees one outcome per call, and an open breaker fails at once,
      never queueing, retrying or hedging.

    With `hedge: {after: pNN}`, a `Latency` recorder sits between hedge and timeout: it times
    each successful attempt, and the hedge reads its percentile before each call.

    `traced` (only when traces are exported): two observing policies, the first outermost (one
    call), the second around each attempt, just inside hedging (a hedge is an attempt too).
    """
    plan = cfg if isinstance(cfg, SourcePlan) else compile_source(name, cfg)
    source: Source = upstream.call
    limit = policies.Limit(plan.max_in_flight) if plan.max_in_flight else None
    if limit is not None:
        source = limit(source)
    source = policies.timeout(source)
    budget = policies.Budget((plan.retry or policies.RetrySettings()).budget_ratio)
    hedge = latency = None
    if plan.hedge is not None:
        after: float | Callable[[], float | None]
        quantile = plan.hedge.quantile
        if quantile is None:
            after = plan.hedge.after_s
        else:
            latency = Latency()
            source = latency(source)
            after = partial(latency.quantile, quantile)
        if traced is not None:
            source = traced[1](source)
        hedge = policies.Hedge(after, budget, on_hedge=on_hedge)
        source = hedge(source)
    elif traced is not None:
        source = traced[1](source)
    retry = None
    if (plan.retry is not None and plan.retry.attempts > 1) or hedge is not None:
        # A hedged source without retries still gets a one-attempt Retry: it counts the calls
        # that the hedges' share of the budget is measured against.
        once = policies.RetrySettings(attempts=1)
        retry = policies.Retry(plan.retry or once, budget, on_retry=on_retry)
        source = retry(source)
    breaker = Breaker(plan.breaker, name, on_change=on_change) if plan.breaker else None
    if breaker is not None:
        source = breaker(source)
    if traced is not None:
        source = traced[0](source)
    return Guarded(source, breaker, retry, limit, hedge, latency)
