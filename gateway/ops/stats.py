"""Live per-source statistics over a sliding window: latency percentiles, outcome ratios, the share
of calls the timeout cut, the timeout the data suggests, and why calls failed.

Recording is on the hot path, so it is a few integer increments: time is cut into slots
(`window_s / slots` seconds each) and each slot counts outcomes and latencies in log-spaced bins
(5 % wide, 0.05 ms to about 10 minutes). Reading merges the slots still in the window; its
percentiles are exact to one bin (the bin's upper edge is reported). Failure reasons are counted
per slot too, each slot keeping at most `MAX_REASONS` distinct ones of at most `REASON_CHARS`
characters, so an upstream that fails in ever new ways cannot grow them.

Under `gateway serve --workers N` each worker counts its own calls; `window()` gives the raw
counts another worker merges (`merge_windows`) before `summary` computes the percentiles, so
merged percentiles are those of every worker's calls, exact to one bin as in one process.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from gateway.core.types import ANSWERED, ASKED, OUTCOMES, Outcome
from upstreams.breaker import Window

if TYPE_CHECKING:
    from gateway.core.executor import Composite
    from gateway.core.plan import EndpointPlan, SourcePlan

Clock = Callable[[], float]

WINDOW_S = 60.0
"""The span `/admin/sources` reports over."""

SLOTS = 12

MARGIN = 1.25
"""Suggested timeout = p99 of successful calls times this, rounded up to `ROUND_MS`."""

ROUND_MS = 5
MIN_OK_CALLS = 50
"""Fewer successful calls than this in the window and no timeout is suggested."""

MAX_CUT_RATIO = 0.01
"""Above this share of calls cut by the timeout, the real p99 lies beyond it and is unknown."""

TOP_REASONS = 5
"""How many of a source's most frequent failure reasons `/admin/sources` lists."""

MAX_REASONS = 16
"""The most distinct reasons one slot counts; calls failing for yet another are `OTHER`."""

REASON_CHARS = 80
OTHER = "other reasons"

_FIRST_MS = 0.05
_GROWTH = 1.05
_BINS = 400
_EDGES = tuple(_FIRST_MS * _GROWTH**i for i in range(_BINS))
"""Bin i holds latencies above `_EDGES[i - 1]` up to `_EDGES[i]` (the last, anything above)."""


class _Slot:
    __slots__ = ("answered", "attempted", "epoch", "outcomes", "reasons")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.outcomes: dict[str, int] = {}
        self.reasons: dict[str, int] = {}
        self.attempted = [0] * _BINS
        self.answered = [0] * _BINS


class SourceStats:
    """The sliding-window statistics of one source."""

    def __init__(
        self,
        timeout_ms: int,
        window_s: float = WINDOW_S,
        slots: int = SLOTS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.timeout_ms = timeout_ms
        self.window_s = window_s
        self._width = window_s / slots
        self._clock = clock
        self._slots = [_Slot(-1) for _ in range(slots)]

    def record(self, outcome: Outcome, ms: float, reason: str = "") -> None:
        """Count one call's outcome, its failure reason if any and, when the source was asked,
        its latency."""
        self.record_at(self._clock(), outcome, ms, reason)

    def record_at(self, now: float, outcome: Outcome, ms: float, reason: str = "") -> None:
        """Count one call's outcome, reason and latency as of `now` (a reading of this stats'
        clock)."""
        epoch = int(now // self._width)
        slots = self._slots
        i = epoch % len(slots)
        slot = slots[i]
        if slot.epoch != epoch:
            slot = slots[i] = _Slot(epoch)
        outcomes = slot.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if reason:
            reasons = slot.reasons
            reason = reason[:REASON_CHARS]
            if reason not in reasons and len(reasons) >= MAX_REASONS:
                reason = OTHER  # one past the bound: `OTHER` itself may be the 17th key
            reasons[reason] = reasons.get(reason, 0) + 1
        if outcome in ASKED:
            b = bisect_left(_EDGES, ms)  # a C search of 400 floats: cheaper than a log
            if b == _BINS:
                b = _BINS - 1
            slot.attempted[b] += 1
            if outcome in ANSWERED:
                slot.answered[b] += 1

    def window(self) -> dict[str, Any]:
        """Return the window's raw counts as plain data (outcomes, reasons, and the latency
        histograms as sparse [bin, count] pairs): what `summary` reads, and what workers merge."""
        oldest = int(self._clock() // self._width) - len(self._slots)
        live = [s for s in self._slots if s.epoch > oldest]
        outcomes: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for s in live:
            for name, n in s.outcomes.items():
                outcomes[name] = outcomes.get(name, 0) + n
            for reason, n in s.reasons.items():
                reasons[reason] = reasons.get(reason, 0) + n
        return {
            "outcomes": outcomes,
            "reasons": reasons,
            "attempted": _sparse(_merge(s.attempted for s in live)),
            "answered": _sparse(_merge(s.answered for s in live)),
        }

    def snapshot(self) -> dict[str, Any]:
        """Return counts, ratios, p50/p95/p99 (ms), the cut share, a suggested timeout and the
        most frequent failure reasons with their counts."""
        return summary(self.window(), self.timeout_ms)


def merge_windows(windows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Return one window holding every given `SourceStats.window()`'s counts (counts summed,
    histograms summed bin by bin, so percentiles of the result are those of all calls)."""
    outcomes: dict[str, int] = {}
    reasons: dict[str, int] = {}
    attempted = [0] * _BINS
    answered = [0] * _BINS
    for w in windows:
        for name, n in w["outcomes"].items():
            outcomes[name] = outcomes.get(name, 0) + n
        for reason, n in w["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
        for into, pairs in ((attempted, w["attempted"]), (answered, w["answered"])):
            for i, n in pairs:
                if 0 <= i < _BINS:
                    into[i] += n
    return {
        "outcomes": outcomes,
        "reasons": reasons,
        "attempted": _sparse(attempted),
        "answered": _sparse(answered),
    }


def summary(window: Mapping[str, Any], timeout_ms: int) -> dict[str, Any]:
    """Return a window's counts, ratios, p50/p95/p99 (ms), cut share, suggested timeout (for a
    source whose timeout is `timeout_ms`) and its most frequent failure reasons."""
    outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
    for name, n in window["outcomes"].items():
        outcomes[name] = outcomes.get(name, 0) + n
    attempted = _dense(window["attempted"])
    answered = _dense(window["answered"])
    count = sum(outcomes.values())
    tried = sum(attempted)
    cut = outcomes["timeout"] / tried if tried else 0.0
    ok_p99 = _percentile(answered, 0.99)
    suggested, note = _suggest(timeout_ms, sum(answered), ok_p99, cut)
    reasons: dict[str, int] = window["reasons"]
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]
    return {
        "count": count,
        "outcomes": outcomes,
        "ratios": {k: round(v / count, 4) if count else 0.0 for k, v in outcomes.items()},
        "p50_ms": _percentile(attempted, 0.50),
        "p95_ms": _percentile(attempted, 0.95),
        "p99_ms": _percentile(attempted, 0.99),
        "ok_p99_ms": ok_p99,
        "timeout_ms": timeout_ms,
        "cut_by_timeout": round(cut, 4),
        "suggested_timeout_ms": suggested,
        "suggestion": note,
        "reasons": [{"reason": reason, "count": n} for reason, n in top],
    }


def _suggest(
    timeout_ms: int, answered: int, ok_p99: float | None, cut: float
) -> tuple[int | None, str]:
    if cut > MAX_CUT_RATIO:
        return None, (
            f"{cut:.1%} of calls were cut at {timeout_ms} ms, so the real p99 lies "
            "beyond it: raise the timeout to measure it"
        )
    if ok_p99 is None or answered < MIN_OK_CALLS:
        return None, f"fewer than {MIN_OK_CALLS} successful calls in the window"
    ms = max(ROUND_MS, math.ceil(ok_p99 * MARGIN / ROUND_MS) * ROUND_MS)
    return ms, f"p99 of successful calls x {MARGIN:g}, rounded up to {ROUND_MS} ms"


def _sparse(histogram: list[int]) -> list[list[int]]:
    return [[i, n] for i, n in enumerate(histogram) if n]


def _dense(pairs: Iterable[Iterable[int]]) -> list[int]:
    histogram = [0] * _BINS
    for i, n in pairs:
        if 0 <= i < _BINS:
            histogram[i] += n
    return histogram


def _merge(histograms: Iterable[list[int]]) -> list[int]:
    total = [0] * _BINS
    for h in histograms:
        for i, n in enumerate(h):
            if n:
                total[i] += n
    return total


def _percentile(histogram: list[int], q: float) -> float | None:
    """Return the upper edge (ms) of the bin holding the `q` quantile, or None with no data."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(histogram):
        seen += n
        if seen >= rank:
            return round(_EDGES[i], 2)
    return round(_EDGES[-1], 2)


class CacheStats:
    """How many lookups the cache answered from storage over the window, and out of how many."""

    def __init__(self, window_s: float = WINDOW_S, clock: Clock = time.monotonic) -> None:
        self._window = Window(window_s, clock)
        self.window_s = window_s

    def __call__(self, event: str) -> None:
        """Count one cache event (`CompositeCache.on_event`); lookups only, the rest ignored."""
        if event in ("hit", "stale"):
            self._window.add(1, 1)
        elif event in ("miss", "bypass"):
            self._window.add(1, 0)

    def window(self) -> dict[str, int]:
        """Return the window's lookups and hits: what `cache_summary` reads, and what workers
        sum."""
        lookups, hits = self._window.counts()
        return {"lookups": lookups, "hits": hits}

    def snapshot(self) -> dict[str, Any]:
        """Return lookups, lookups answered from storage, and their ratio."""
        return cache_summary(self.window())


def cache_summary(window: Mapping[str, int]) -> dict[str, Any]:
    """Return a cache window's lookups, hits and hit ratio."""
    lookups, hits = window["lookups"], window["hits"]
    return {
        "lookups": lookups,
        "hits": hits,
        "hit_ratio": round(hits / lookups, 4) if lookups else None,
    }


class Stats:
    """Statistics of every source of the running config, and of the cache."""

    def __init__(self, window_s: float = WINDOW_S, clock: Clock = time.monotonic) -> None:
        self.window_s = window_s
        self.sources: dict[str, SourceStats] = {}
        self.cache = CacheStats(window_s, clock)
        self._plans: Mapping[str, SourcePlan] = {}
        self._clock = clock

    def sync(self, plans: Mapping[str, SourcePlan]) -> None:
        """Follow a (re)loaded config's compiled sources: a new or changed one starts a fresh
        window."""
        fresh = {}
        for name, plan in plans.items():
            old = self.sources.get(name)
            if old is not None and self._plans.get(name) == plan:
                fresh[name] = old
            else:
                fresh[name] = SourceStats(plan.timeout_ms, self.window_s, clock=self._clock)
        self.sources, self._plans = fresh, dict(plans)

    def window(self) -> dict[str, Any]:
        """Return every source's and the cache's raw window counts, as plain data for another
        worker to merge."""
        return {
            "window_s": self.window_s,
            "sources": {name: s.window() for name, s in self.sources.items()},
            "cache": self.cache.window(),
        }

    def calls(self, plan: EndpointPlan, composite: Composite) -> None:
        """Count every call of one fan-out under its source, all as of the fan-out's end, with
        the reason of each that failed (a skipped call's is another source's failure, not
        counted)."""
        results = composite.results
        sources = self.sources
        now = self._clock()
        for cp in plan.calls:
            r = results.get(cp.name)
            if r is not None:
                stats = sources.get(cp.source)
                if stats is not None:  # calls of a source that was just removed are dropped
                    outcome = r.outcome
                    failed = outcome != "ok" and outcome != "skipped"
                    stats.record_at(now, outcome, r.ms, r.detail if failed else "")
