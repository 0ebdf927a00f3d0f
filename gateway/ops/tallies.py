"""A fan-out's call metrics as plain tallies: counted without prometheus_client's per-update
locks (the event loop is one thread), exposed at scrape time as the very series its Histogram
and Counters would write (single-process mode only: in multiprocess mode every worker's scrape
reads prometheus_client's files)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.core.types import OUTCOMES

CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)

CALL_SECONDS_HELP = "Time of calls that reached their source (ok, not_found, error, timeout)."
CALL_OUTCOMES_HELP = "Calls by outcome: " + ", ".join(OUTCOMES) + "."
FALLBACKS_HELP = "Failed optional calls answered by their fallback (or left out: fallback omit)."
CALL_BOUNDS = (*CALL_BUCKETS, float("inf"))
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)
"""Whether `_created` series are exposed, as prometheus_client decides it for its own metrics."""


class CallTally:
    """One (source, call)'s counts since the process started: outcomes, latency buckets (not
    cumulative, one per bound of `CALL_BOUNDS`), latency sum and fallbacks taken."""

    __slots__ = ("buckets", "call", "created", "fallbacks", "outcomes", "seen", "source", "sum")

    def __init__(self, source: str, call: str, seen: Seen) -> None:
        self.source = source
        self.call = call
        self.seen = seen
        self.outcomes: dict[str, int] = {}
        self.buckets = [0] * len(CALL_BOUNDS)
        self.sum = 0.0
        self.fallbacks = 0
        self.created = 0.0

    def first(self, outcome: str) -> int:
        """Note when `outcome` (and the call itself) was first counted, in that order, as
        prometheus_client's `labels()` would have created their series; return 0."""
        now = time.time()
        if not self.created:
            self.created = now
            self.seen.calls.append(self)
        self.seen.outcomes.append((self, outcome, now))
        return 0


class Seen:
    """The call tallies and their outcomes in the order each was first counted (the order
    prometheus_client would list their series in)."""

    def __init__(self) -> None:
        self.calls: list[CallTally] = []
        self.outcomes: list[tuple[CallTally, str, float]] = []


Counted = tuple[str, CallTally, bool]
"""(call name, its tally, whether it is optional) for one call of a plan."""


class CallCollector(Collector):
    """Exposes the call tallies as prometheus_client's Histogram and Counters would."""

    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def collect(self) -> Iterator[Metric]:
        seconds = HistogramMetricFamily(
            "gateway_call_duration_seconds", CALL_SECONDS_HELP, labels=["source", "call"]
        )
        outcomes = CounterMetricFamily(
            "gateway_call_outcomes", CALL_OUTCOMES_HELP, labels=["source", "call", "outcome"]
        )
        fallbacks = CounterMetricFamily(
            "gateway_call_fallbacks", FALLBACKS_HELP, labels=["source", "call"]
        )
        for t in list(self.seen.calls):
            labels = [t.source, t.call]
            acc = 0
            buckets = []
            for bound, n in zip(CALL_BOUNDS, t.buckets, strict=True):
                acc += n
                buckets.append((floatToGoString(bound), float(acc)))
            seconds.add_metric(labels, buckets, t.sum)
            created = t.created if _CREATED else None
            if created is not None:
                # HistogramMetricFamily takes no created time: the series prometheus_client's
                # own Histogram writes after _sum.
                seconds.add_sample(
                    "gateway_call_duration_seconds_created",
                    {"source": t.source, "call": t.call},
                    created,
                )
            fallbacks.add_metric(labels, float(t.fallbacks), created=created)
        for t, outcome, when in list(self.seen.outcomes):
            outcomes.add_metric(
                [t.source, t.call, outcome],
                float(t.outcomes[outcome]),
                created=when if _CREATED else None,
            )
        return iter((seconds, outcomes, fallbacks))
