"""The live latency ring that percentile hedging reads."""

from __future__ import annotations

import pytest

from gateway.core.errors import SourceUnavailable
from gateway.core.types import Call
from upstreams.latency import Latency


def test_no_quantile_until_min_samples() -> None:
    latency = Latency(min_samples=3)
    latency.record(0.01)
    latency.record(0.02)
    assert latency.quantile(0.95) is None
    latency.record(0.03)
    assert latency.quantile(0.95) == 0.03


def test_quantile_is_the_nearest_rank_of_recorded_durations() -> None:
    latency = Latency(min_samples=1)
    for ms in range(1, 101):
        latency.record(ms / 1000)
    assert latency.quantile(0.5) == 0.050
    assert latency.quantile(0.95) == 0.095
    assert latency.quantile(0.99) == 0.099
    assert latency.quantile(1.0) == 0.100
    assert latency.quantile(0.0) == 0.001


def test_ring_keeps_only_the_most_recent_durations() -> None:
    latency = Latency(size=10, min_samples=1)
    for _ in range(100):
        latency.record(1.0)
    for _ in range(10):
        latency.record(0.001)
    assert latency.quantile(0.99) == 0.001


async def test_records_successful_attempts_only() -> None:
    ticks = iter([0.0, 0.25, 1.0])
    latency = Latency(min_samples=1, clock=lambda: next(ticks))
    outcomes = iter([None, SourceUnavailable("down", status=503)])

    async def source(call: Call) -> str:
        exc = next(outcomes)
        if exc is not None:
            raise exc
        return "ok"

    timed = latency(source)
    call = Call("s", "c", "/", {}, 1.0, float("inf"))
    assert await timed(call) == "ok"
    with pytest.raises(SourceUnavailable):
        await timed(call)
    assert latency.quantile(1.0) == 0.25
    assert latency.quantile(0.0) == 0.25  # the failure was not recorded
