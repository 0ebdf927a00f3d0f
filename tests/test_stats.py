"""Per-source window statistics on an injected clock: percentiles, window, cut share, suggestion."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.ops.stats import (
    MAX_REASONS,
    OTHER,
    REASON_CHARS,
    SLOTS,
    TOP_REASONS,
    CacheStats,
    SourceStats,
    Stats,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percentiles_are_within_one_bin_of_the_true_ones() -> None:
    stats = SourceStats(timeout_ms=500, clock=Clock())
    for ms in range(1, 101):  # 1..100 ms, once each
        stats.record("ok", float(ms))
    snap = stats.snapshot()
    assert snap["count"] == 100
    for key, true in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99)):
        assert true <= snap[key] <= true * 1.05 + 0.01, (key, snap[key])


def test_suggested_timeout_is_the_ok_p99_with_a_margin_rounded_up_to_5_ms() -> None:
    stats = SourceStats(timeout_ms=500, clock=Clock())
    for _ in range(200):
        stats.record("ok", 40.0)
    snap = stats.snapshot()
    assert snap["suggested_timeout_ms"] % 5 == 0
    assert 50 <= snap["suggested_timeout_ms"] <= 55  # 40 ms (one bin) x 1.25


def test_no_suggestion_from_few_calls_or_when_the_timeout_hides_the_p99() -> None:
    few = SourceStats(timeout_ms=100, clock=Clock())
    for _ in range(10):
        few.record("ok", 5.0)
    assert few.snapshot()["suggested_timeout_ms"] is None
    cut = SourceStats(timeout_ms=100, clock=Clock())
    for _ in range(95):
        cut.record("ok", 5.0)
    for _ in range(5):
        cut.record("timeout", 100.0)
    snap = cut.snapshot()
    assert snap["cut_by_timeout"] == 0.05
    assert snap["suggested_timeout_ms"] is None and "cut at 100 ms" in snap["suggestion"]


def test_outcomes_that_never_reached_the_source_count_but_have_no_latency() -> None:
    stats = SourceStats(timeout_ms=100, clock=Clock())
    stats.record("ok", 10.0)
    stats.record("circuit_open", 0.0)
    stats.record("skipped", 0.0)
    snap = stats.snapshot()
    assert snap["count"] == 3
    assert snap["ratios"]["circuit_open"] == round(1 / 3, 4)
    assert snap["p50_ms"] is not None and snap["p50_ms"] >= 10.0


def test_calls_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    stats = SourceStats(timeout_ms=100, window_s=60, clock=clock)
    stats.record("error", 50.0)
    clock.now += 30
    stats.record("ok", 5.0)
    assert stats.snapshot()["count"] == 2
    clock.now += 40
    snap = stats.snapshot()
    assert snap["count"] == 1 and snap["outcomes"]["error"] == 0
    clock.now += 61
    assert stats.snapshot()["count"] == 0 and stats.snapshot()["p50_ms"] is None


def test_cache_hit_ratio_counts_stale_answers_as_hits() -> None:
    cache = CacheStats(clock=Clock())
    for event in ("hit", "stale", "miss", "bypass", "singleflight_wait", "refresh"):
        cache(event)
    assert cache.snapshot() == {"lookups": 4, "hits": 2, "hit_ratio": 0.5}


def test_a_latency_on_a_bin_edge_reports_that_edge_and_beyond_the_last_the_last() -> None:
    on_edge = SourceStats(timeout_ms=500, clock=Clock())
    on_edge.record("ok", 0.05 * 1.05**10)
    assert on_edge.snapshot()["p50_ms"] == round(0.05 * 1.05**10, 2)
    beyond = SourceStats(timeout_ms=500, clock=Clock())
    beyond.record("ok", 1e12)
    assert beyond.snapshot()["p50_ms"] == round(0.05 * 1.05**399, 2)


def test_a_fan_out_counts_each_call_under_its_source_and_drops_removed_sources() -> None:
    stats = Stats(clock=Clock())
    stats.sources = {"a": SourceStats(timeout_ms=100, clock=Clock())}
    plan = SimpleNamespace(
        calls=(SimpleNamespace(name="x", source="a"), SimpleNamespace(name="y", source="gone"))
    )
    results = {
        "x": SimpleNamespace(outcome="ok", ms=3.0),
        "y": SimpleNamespace(outcome="ok", ms=1.0),
    }
    stats.calls(plan, SimpleNamespace(results=results))
    snap = stats.sources["a"].snapshot()
    assert snap["count"] == 1 and snap["outcomes"]["ok"] == 1


def test_reasons_are_the_most_frequent_failures_of_the_window_with_counts() -> None:
    clock = Clock()
    stats = SourceStats(timeout_ms=100, window_s=60, clock=clock)
    for reason, n in (("old", 50), ("HTTP 503", 3), ("timeout", 5), ("not JSON", 1)):
        for _ in range(n):
            stats.record("error", 5.0, reason)
        if reason == "old":
            clock.now += 61  # out of the window before the others come
    for reason in ("a", "b", "c"):
        stats.record("error", 5.0, reason)
    stats.record("ok", 5.0)
    reasons = stats.snapshot()["reasons"]
    assert len(reasons) == TOP_REASONS == 5
    # Most frequent first, ties by text (so two reads of the same window agree).
    assert reasons == [
        {"reason": "timeout", "count": 5},
        {"reason": "HTTP 503", "count": 3},
        {"reason": "a", "count": 1},
        {"reason": "b", "count": 1},
        {"reason": "c", "count": 1},
    ]
    clock.now += 61
    assert stats.snapshot()["reasons"] == []


def test_reasons_stay_bounded_whatever_an_upstream_makes_them() -> None:
    clock = Clock()
    stats = SourceStats(timeout_ms=100, window_s=60, clock=clock)
    for i in range(5000):
        if i % 500 == 0:
            clock.now += 5  # spread over every slot of the window
        stats.record("error", 1.0, f"HTTP {i} " + "x" * 1000)
    kept = sum(len(slot.reasons) for slot in stats._slots)
    assert kept <= SLOTS * (MAX_REASONS + 1)
    assert all(len(r) <= REASON_CHARS for slot in stats._slots for r in slot.reasons)
    # Ten slots of 500 calls each: the first MAX_REASONS distinct reasons of each, the rest OTHER.
    snap = stats.snapshot()
    assert snap["count"] == 5000
    assert snap["reasons"][0] == {"reason": OTHER, "count": 10 * (500 - MAX_REASONS)}


def test_a_fan_out_counts_the_reasons_of_its_failed_calls_but_not_of_skipped_ones() -> None:
    stats = Stats(clock=Clock())
    stats.sources = {"a": SourceStats(timeout_ms=100, clock=Clock())}
    plan = SimpleNamespace(calls=tuple(SimpleNamespace(name=n, source="a") for n in "wxyz"))
    results = {
        "w": SimpleNamespace(outcome="ok", ms=3.0, detail=""),
        "x": SimpleNamespace(outcome="error", ms=3.0, detail="HTTP 503"),
        "y": SimpleNamespace(outcome="not_found", ms=1.0, detail="HTTP 404"),
        "z": SimpleNamespace(outcome="skipped", ms=0.0, detail="product failed"),
    }
    stats.calls(plan, SimpleNamespace(results=results))
    snap = stats.sources["a"].snapshot()
    assert snap["count"] == 4
    assert snap["reasons"] == [
        {"reason": "HTTP 404", "count": 1},
        {"reason": "HTTP 503", "count": 1},
    ]
