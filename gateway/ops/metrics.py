"""Prometheus metrics: what requests, calls, retries, the cache and breakers did, and pool usage.

Counters and histograms are updated as things happen. A fan-out's calls are counted in plain
per-(source, call) tallies, without prometheus_client's per-update locks (the event loop is one
thread), and exposed by a collector at scrape time in prometheus_client's exact series; in
multiprocess mode they go through prometheus_client's metrics, whose files every worker's scrape
reads. Pool usage and breaker states are read
from the running sources: at scrape time in one process, and by a once-a-second sampler per
worker in multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set, as `gateway serve --workers N`
does), where a scrape reaches one worker but must report them all.

prometheus_client's process and Python collectors (`process_*`, `python_gc_*`, `python_info`)
describe the process that answers the scrape; in multiprocess mode each worker shares its own
(`process_families`) and a scrape reports every worker's by `pid` (`gateway.workers`).
"""

from __future__ import annotations

import asyncio
import bisect
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from gateway.core.context import RequestContext
from gateway.core.types import ASKED
from gateway.ops.tallies import (
    CALL_BOUNDS,
    CALL_BUCKETS,
    CALL_OUTCOMES_HELP,
    CALL_SECONDS_HELP,
    FALLBACKS_HELP,
    CallCollector,
    CallTally,
    Counted,
    Seen,
)

if TYPE_CHECKING:
    from gateway.core.executor import Composite
    from gateway.core.plan import CallPlan, EndpointPlan, Guarded
    from gateway.core.types import Upstream

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUEST_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0, 2.5, 5.0)

MAX_FANOUTS = 4096
"""Plans whose calls `Metrics` keeps resolved to their tallies, across reloads."""

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

BREAKER_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
"""`gateway_breaker_state`: 0 closed, 1 half open, 2 open."""

LiveSample = tuple[str, str, float]
"""(metric name, source, value) read from a running source."""

Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]
"""One metric family as plain data: (name, type, help, [(sample name, labels, value)])."""


class Live(Protocol):
    """The running sources, as the live samples read them (`gateway.runtime.Runtime`)."""

    @property
    def upstreams(self) -> Mapping[str, Upstream]: ...

    @property
    def guards(self) -> Mapping[str, Guarded]: ...


_LIVE_HELP = {
    "gateway_pool_size": "Connections open in a source's pool.",
    "gateway_pool_in_use": "Connections of a source's pool lent to a call right now.",
    "gateway_pool_max": "The most connections a source's pool may open.",
    "gateway_breaker_state": "A source's circuit breaker: 0 closed, 1 half open, 2 open.",
}


_OWN: tuple[Collector, ...] = (
    ProcessCollector(registry=None),
    GCCollector(registry=CollectorRegistry()),  # it must register somewhere: not in ours
)


def multiprocess_dir() -> str | None:
    """Return the multiprocess-mode directory, or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """The gateway's metrics in their own registry, with one method per thing that happened."""

    def __init__(self, current: Callable[[], Live | None] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.workers: Collector | None = None
        """Every worker's process samples, for multiprocess scrapes (`gateway.workers`)."""
        # The process's own samples, apart: `registry` holds the gateway's series alone.
        self.process_registry = CollectorRegistry()
        for collector in (*_OWN, PlatformCollector(registry=None)):
            self.process_registry.register(collector)
        self.requests = Counter(
            "gateway_requests", "Requests by route and status.", ["endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to last response byte, by route.",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        if multiprocess_dir() is None:
            self._tallies: dict[tuple[str, str], CallTally] = {}
            self._fanouts: dict[int, tuple[EndpointPlan, tuple[Counted, ...]]] = {}
            self._seen = Seen()
            r.register(CallCollector(self._seen))
        else:
            self.call_seconds = Histogram(
                "gateway_call_duration_seconds",
                CALL_SECONDS_HELP,
                ["source", "call"],
                buckets=CALL_BUCKETS,
                registry=r,
            )
            self.call_outcomes = Counter(
                "gateway_call_outcomes",
                CALL_OUTCOMES_HELP,
                ["source", "call", "outcome"],
                registry=r,
            )
            self.fallbacks = Counter(
                "gateway_call_fallbacks", FALLBACKS_HELP, ["source", "call"], registry=r
            )
        self.retries = Counter(
            "gateway_retries", "Retries sent to a source.", ["source"], registry=r
        )
        self.hedges = Counter(
            "gateway_hedges", "Hedged second attempts sent to a source.", ["source"], registry=r
        )
        self.cache_events = Counter(
            "gateway_cache_events",
            "Cache lookups and their fate: hit, miss, stale, bypass, stale_if_error, refresh, "
            "refresh_failed, error.",
            ["event"],
            registry=r,
        )
        self.singleflight_waits = Counter(
            "gateway_singleflight_waits",
            "Cache misses that waited for another request's fan-out instead of running one.",
            registry=r,
        )
        self.breaker_transitions = Counter(
            "gateway_breaker_transitions",
            "Circuit breaker state changes, by source and new state.",
            ["source", "state"],
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 25 ms: a starved or blocked process.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag = self.loop_lag_seconds.observe
        self.calls: Callable[[EndpointPlan, Composite], None] = (
            self._count_calls if multiprocess_dir() is None else self._count_locked
        )
        """Count every call of one fan-out: outcome, latency, and fallback taken."""
        self._calls: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._routes: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._cache_events: dict[str, Any] = {}
        self._live: dict[str, Gauge] = {}
        self.current = current
        if current is not None:
            self.registry.register(LiveCollector(current))

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one request and its duration."""
        key = (endpoint, status)
        children = self._routes.get(key)
        if children is None:
            children = self._routes[key] = (
                self.requests.labels(endpoint, str(status)),
                self.request_seconds.labels(endpoint),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _count_calls(self, plan: EndpointPlan, composite: Composite) -> None:
        """Count every call of one fan-out in the plain tallies (single-process mode)."""
        fanout = self._fanouts.get(id(plan))
        if fanout is None or fanout[0] is not plan:
            if len(self._fanouts) >= MAX_FANOUTS:
                # Each reload brings new plans and the old ones stay here (a slotted plan takes
                # no weak reference): start over rather than grow.
                self._fanouts.clear()
            fanout = self._fanouts[id(plan)] = (plan, self._counted(plan.calls))
        results = composite.results
        for name, tally, optional in fanout[1]:
            r = results.get(name)
            if r is None:
                continue
            outcome = r.outcome
            counts = tally.outcomes
            n = counts.get(outcome)
            if n is None:
                n = tally.first(outcome)
            counts[outcome] = n + 1
            if outcome in ASKED:
                seconds = r.ms / 1000
                tally.buckets[bisect.bisect_left(CALL_BOUNDS, seconds)] += 1
                tally.sum += seconds
            if optional and outcome != "ok":
                tally.fallbacks += 1

    def _counted(self, calls: tuple[CallPlan, ...]) -> tuple[Counted, ...]:
        counted = []
        for cp in calls:
            key = (cp.source, cp.name)
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = CallTally(cp.source, cp.name, self._seen)
            counted.append((cp.name, tally, not cp.required))
        return tuple(counted)

    def _count_locked(self, plan: EndpointPlan, composite: Composite) -> None:
        """Count every call of one fan-out in prometheus_client's metrics (multiprocess mode)."""
        results = composite.results
        for cp in plan.calls:
            r = results.get(cp.name)
            if r is None:
                continue
            key = (cp.source, cp.name, r.outcome)
            children = self._calls.get(key)
            if children is None:
                children = self._calls[key] = (
                    self.call_outcomes.labels(*key),
                    self.call_seconds.labels(cp.source, cp.name),
                    self.fallbacks.labels(cp.source, cp.name),
                )
            children[0].inc()
            if r.outcome in ASKED:
                children[1].observe(r.ms / 1000)
            if r.outcome != "ok" and not cp.required:
                children[2].inc()

    def cache_event(self, event: str) -> None:
        """Count one `CompositeCache.on_event` event."""
        if event == "singleflight_wait":
            self.singleflight_waits.inc()
            return
        child = self._cache_events.get(event)
        if child is None:
            child = self._cache_events[event] = self.cache_events.labels(event)
        child.inc()

    def retry(self, source: str) -> None:
        """Count one retry sent to `source`."""
        self.retries.labels(source).inc()

    def hedge(self, source: str) -> None:
        """Count one hedged second attempt sent to `source`."""
        self.hedges.labels(source).inc()

    def breaker_change(self, source: str, state: str) -> None:
        """Count one breaker transition of `source` into `state`."""
        self.breaker_transitions.labels(source, state).inc()

    def exposition(self) -> bytes:
        """Return the text exposition: this registry and this process's samples, or every
        worker's in multiprocess mode."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry) + generate_latest(self.process_registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        PlatformCollector(registry=registry)
        if self.workers is not None:
            registry.register(self.workers)
        return generate_latest(registry)

    def sample(self, runtime: Live) -> None:
        """Write this worker's pool usage and breaker states for multiprocess scrapes."""
        for name, source, value in live_samples(runtime):
            gauge = self._live.get(name)
            if gauge is None:
                # Created on first use, outside the registry: only a multiprocess worker needs
                # them, and there a scrape reads them from the worker's files. Pools add up
                # across workers; a breaker is as open as its most open worker's.
                gauge = self._live[name] = Gauge(
                    name,
                    _LIVE_HELP[name],
                    ["source"],
                    registry=None,
                    multiprocess_mode="livemax" if name == "gateway_breaker_state" else "livesum",
                )
            gauge.labels(source).set(value)


def live_samples(runtime: Live) -> Iterator[LiveSample]:
    """Yield pool size, in-use and max per source, and the state of each breaker."""
    for name, upstream in runtime.upstreams.items():
        stats = upstream.pool_stats()
        in_use = stats.get("in_use", 0)
        size = stats.get("size", in_use + stats.get("idle", 0))
        yield "gateway_pool_size", name, float(size)
        yield "gateway_pool_in_use", name, float(in_use)
        yield "gateway_pool_max", name, float(stats.get("max", stats.get("limit", 0)))
    for name, guarded in runtime.guards.items():
        if guarded.breaker is not None:
            yield "gateway_breaker_state", name, BREAKER_VALUES[guarded.breaker.state]


class LiveCollector(Collector):
    """Reads pool usage and breaker states from the running sources at scrape time."""

    def __init__(self, current: Callable[[], Live | None]) -> None:
        self.current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            name: GaugeMetricFamily(name, text, labels=["source"])
            for name, text in _LIVE_HELP.items()
        }
        runtime = self.current()
        if runtime is not None:
            for name, source, value in live_samples(runtime):
                families[name].add_metric([source], value)
        return iter(families.values())


def process_families() -> list[Family]:
    """Return this process's samples of prometheus_client's process and garbage collector
    collectors, as plain data another worker's scrape can report."""
    families = []
    for collector in _OWN:
        for m in collector.collect():
            samples = [(s.name, dict(s.labels), s.value) for s in m.samples]
            families.append((m.name, m.type, m.documentation, samples))
    return families


async def sample_forever(metrics: Metrics) -> None:
    """Sample live values once a second until cancelled (multiprocess workers only)."""
    while True:
        runtime = metrics.current() if metrics.current is not None else None
        if runtime is not None:
            metrics.sample(runtime)
        await asyncio.sleep(1.0)


def endpoint(metrics: Metrics) -> Callable[..., Any]:
    """Return the `/metrics` route handler."""

    async def handle(request: Request) -> Response:
        if multiprocess_dir() is None:
            # In this thread: reading a breaker's state may move it (open -> half open).
            body = metrics.exposition()
        else:
            body = await asyncio.to_thread(metrics.exposition)  # reads every worker's files
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return handle


def request_observer(metrics: Metrics) -> Callable[[Scope, RequestContext, int, float], None]:
    """Return the access log's observer that counts every HTTP request by template and status."""

    def observe(scope: Scope, info: RequestContext, status: int, seconds: float) -> None:
        # A template, never the raw path, is the label, so label values stay few whatever
        # clients ask for: the endpoint's plan id (as in the access log), else the route
        # the router matched and wrote into this same scope.
        name = info.endpoint or getattr(scope.get("route"), "path", None) or "unmatched"
        metrics.request(name, status, seconds)

    return observe
