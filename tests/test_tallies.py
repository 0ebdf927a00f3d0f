"""The call tallies against prometheus_client's own Histogram and Counters: the same series."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from gateway.ops.metrics import MULTIPROC_ENV, Metrics

OUTCOMES = ("ok", "not_found", "error", "timeout", "circuit_open", "skipped")


def call(source: str, name: str, required: bool) -> SimpleNamespace:
    return SimpleNamespace(source=source, name=name, required=required)


def text(metrics: Metrics) -> str:
    # Only the creation times may differ: each side read the clock itself.
    return re.sub(
        r"_created(\{[^}]*\})? \S+", r"_created\1 T", generate_latest(metrics.registry).decode()
    )


def test_tallies_expose_what_prometheus_client_metrics_would(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    tallied = Metrics()
    # prometheus_client picks its multiprocess value class at import, so these stay in-memory
    # metrics: the locked path multiprocess mode keeps.
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    locked = Metrics()
    monkeypatch.delenv(MULTIPROC_ENV)
    a, b, c, d = (
        call("a", "x", True),
        call("b", "y", False),
        call("a", "z", False),
        call("c", "w", True),
    )
    plans = [SimpleNamespace(calls=(a, b, c)), SimpleNamespace(calls=(b, c, d))]
    rng = random.Random(11)
    assert text(tallied) == text(locked)
    for _ in range(2000):
        plan = rng.choice(plans)
        results = {
            cp.name: SimpleNamespace(outcome=rng.choice(OUTCOMES), ms=rng.expovariate(1 / 40))
            for cp in plan.calls
            if rng.random() < 0.9
        }
        composite = SimpleNamespace(results=results)
        tallied.calls(plan, composite)
        locked.calls(plan, composite)
    exposed = text(tallied)
    assert 'gateway_call_outcomes_total{call="y",outcome="timeout",source="b"}' in exposed
    assert 'gateway_call_duration_seconds_bucket{call="w",le="+Inf",source="c"}' in exposed
    assert exposed == text(locked)


def test_a_plan_seen_again_after_a_reload_is_counted_under_its_own_calls() -> None:
    metrics = Metrics()
    first = SimpleNamespace(calls=(call("a", "x", True),))
    ok = SimpleNamespace(results={"x": SimpleNamespace(outcome="ok", ms=2.0)})
    metrics.calls(first, ok)
    del first
    second = SimpleNamespace(calls=(call("b", "x", True),))  # may reuse the freed id
    metrics.calls(second, ok)
    exposed = text(metrics)
    assert 'gateway_call_outcomes_total{call="x",outcome="ok",source="a"} 1.0' in exposed
    assert 'gateway_call_outcomes_total{call="x",outcome="ok",source="b"} 1.0' in exposed
