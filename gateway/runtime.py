"""A runtime: one loaded config with its plans, started sources and cache, swapped as a whole."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import structlog

from cache.composite import CompositeCache, open_cache
from cache.policy import CacheSettings, NearSettings
from gateway.config.loader import LoadedConfig
from gateway.config.schema import CacheConfig
from gateway.core.context import note_of
from gateway.core.executor import Composite
from gateway.core.listing import ListRunner
from gateway.core.plan import (
    EndpointPlan,
    Guarded,
    SourcePlan,
    build_plans,
    compile_source,
    guard,
    open_upstream,
)
from gateway.core.runner import Runner, runners
from gateway.core.seeing import Seeing
from gateway.core.types import Call, Upstream
from gateway.ops.metrics import Metrics
from gateway.ops.stats import Stats
from gateway.ops.token import token_from_env
from gateway.ops.tracing import Tracing, tracing_for

_log = structlog.get_logger("gateway.runtime")

OpenSource = Callable[[str, SourcePlan], Awaitable[Upstream]]
"""(name, compiled source) -> the started source: how a runtime opens each source it does not
take over."""

opening: ContextVar[OpenSource] = ContextVar("opening", default=open_upstream)
"""How `start` opens sources when not given `open_source`: the kind table's adapter. The contract
runner (`gateway test`) sets its scripted one around the apps it serves, which start their
runtimes themselves."""


@dataclass(frozen=True)
class Runtime:
    """Everything a request needs, immutable: requests in flight keep the one they started on."""

    loaded: LoadedConfig
    plans: Mapping[str, EndpointPlan]
    upstreams: Mapping[str, Upstream]
    guards: Mapping[str, Guarded]
    cache: CompositeCache
    metrics: Metrics
    stats: Stats
    source_plans: Mapping[str, SourcePlan]
    runners: Mapping[str, Runner | ListRunner]
    """One compiled runner per endpoint id: what the edge calls for each request."""
    tracing: Tracing | None = None
    """The span exporter `tracing:` asks for; None: trace context is propagated, not exported."""


async def start(
    loaded: LoadedConfig,
    previous: Runtime | None = None,
    *,
    metrics: Metrics | None = None,
    stats: Stats | None = None,
    plans: Sequence[EndpointPlan] | None = None,
    open_source: OpenSource | None = None,
) -> Runtime:
    """Start a runtime; sources and cache whose config did not change are taken over from
    `previous`, so their pools (and breaker state) survive a reload. Metrics and statistics
    are `previous`'s (or new ones) unless given; `plans` are the config's, when already built;
    `open_source` opens each new source (by default: `opening`'s, the kind table's adapter)."""
    config = loaded.config
    open_source = open_source or opening.get()
    if metrics is None:
        metrics = previous.metrics if previous is not None else Metrics()
    if stats is None:
        stats = previous.stats if previous is not None else Stats()
    on_change, on_retry, on_hedge = _observers(metrics)
    tracing = tracing_for(config.tracing, None if previous is None else previous.tracing)
    traced = None if tracing is None else tracing.policies()
    # Guards hold the tracing policies: a change of `tracing:` guards every source anew (its
    # pool kept, its breaker's and budget's counts started over).
    same_tracing = previous is not None and previous.tracing is tracing
    by_id = {p.id: p for p in (build_plans(config) if plans is None else plans)}
    source_plans = {
        name: compile_source(name, cfg, config.propagation) for name, cfg in config.sources.items()
    }
    kept: dict[str, Upstream] = {}
    guards: dict[str, Guarded] = {}
    opened: dict[str, Upstream] = {}
    try:
        for name, source_plan in source_plans.items():
            if previous is not None and _same_source(previous, source_plan):
                kept[name] = previous.upstreams[name]
                if same_tracing:
                    guards[name] = previous.guards[name]
                    continue
            else:
                opened[name] = await open_source(name, source_plan)
            guards[name] = guard(
                name,
                source_plan,
                kept.get(name) or opened[name],
                on_change=on_change,
                on_retry=on_retry,
                on_hedge=on_hedge,
                traced=traced,
            )
    except BaseException:
        await asyncio.gather(*(u.close() for u in opened.values()), return_exceptions=True)
        raise
    if previous is not None and previous.loaded.config.cache == config.cache:
        cache = previous.cache
    else:
        cache = open_cache(cache_settings(config.cache))
    cache.on_event = _cache_observer(metrics, stats)
    sources = {name: g.call for name, g in guards.items()}
    stats.sync(source_plans)
    count, record = metrics.calls, stats.calls

    def observe(plan: EndpointPlan, composite: Composite) -> None:
        count(plan, composite)
        record(plan, composite)

    compiled: dict[str, Runner | ListRunner] = {}
    seeing = Seeing(tracing, explain_token(), {n: g.breaker for n, g in guards.items()})
    compiled.update(runners(by_id, sources, cache, config.cache.key_prefix, observe, seeing))
    for pid, plan in by_id.items():
        if plan.listing is not None:
            item = compiled[plan.listing.item]
            assert isinstance(item, Runner)
            compiled[pid] = ListRunner(plan, item, sources, observe)
    return Runtime(
        loaded,
        by_id,
        {**kept, **opened},
        guards,
        cache,
        metrics,
        stats,
        source_plans,
        compiled,
        tracing,
    )


def explain_token() -> bytes | None:
    """Return the admin token that `X-Gateway-Explain` needs, or None (no admin: no explain)."""
    try:
        token = token_from_env()
    except ValueError:  # too short: the app refuses to start; a bare runtime explains nothing
        return None
    return None if token is None else token.encode()


def cache_settings(cfg: CacheConfig) -> CacheSettings:
    """Return the cache's own settings for a `cache:` block."""
    near = cfg.near
    return CacheSettings(
        url=cfg.url,
        key_prefix=cfg.key_prefix,
        op_timeout_s=cfg.op_timeout_ms / 1000,
        memory_max_entries=cfg.memory_max_entries,
        memory_max_bytes=cfg.memory_max_bytes,
        compress_min_bytes=cfg.compress_min_bytes,
        max_entry_bytes=cfg.max_entry_bytes,
        near=None if near is None else NearSettings(near.max_entries, near.ttl_s),
    )


def _observers(
    metrics: Metrics,
) -> tuple[Callable[[str, str, str], None], Callable[[Call, int], None], Callable[[Call], None]]:
    def on_change(source: str, old: str, new: str) -> None:
        metrics.breaker_change(source, new)
        _log.warning("breaker_state_changed", source=source, old=old, new=new)

    def on_retry(call: Call, attempt: int) -> None:
        metrics.retry(call.source)
        note = note_of(call.name)
        if note is not None:
            note["attempts"] = attempt

    def on_hedge(call: Call) -> None:
        metrics.hedge(call.source)
        note = note_of(call.name)
        if note is not None:
            note["hedges"] = note.get("hedges", 0) + 1

    return on_change, on_retry, on_hedge


def _cache_observer(metrics: Metrics, stats: Stats) -> Callable[[str], None]:
    count, window = metrics.cache_event, stats.cache

    def on_event(event: str) -> None:
        count(event)
        window(event)

    return on_event


def _same_source(previous: Runtime, plan: SourcePlan) -> bool:
    # Compiled plans compare by value: HTTP ones hold the propagation header names they send.
    return previous.source_plans.get(plan.name) == plan and plan.name in previous.upstreams


async def stop(runtime: Runtime, successor: Runtime | None = None) -> None:
    """Close what `runtime` owns and `successor` did not take over."""
    keep = {id(u) for u in successor.upstreams.values()} if successor else set()
    closing = [u.close() for u in runtime.upstreams.values() if id(u) not in keep]
    results = await asyncio.gather(*closing, return_exceptions=True)
    for r in results:
        if isinstance(r, Exception):
            _log.warning("source_close_failed", error=repr(r))
    if successor is None or successor.cache is not runtime.cache:
        await runtime.cache.close()
    if runtime.tracing is not None and (
        successor is None or successor.tracing is not runtime.tracing
    ):
        await runtime.tracing.shutdown()
