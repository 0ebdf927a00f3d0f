"""The circuit breaker, driven by an injected clock: no sleeping."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.errors import (
    BadPayload,
    CircuitOpen,
    NotFound,
    Overloaded,
    SourceError,
    SourceTimeout,
    SourceUnavailable,
)
from gateway.core.types import Call
from upstreams.breaker import Breaker, BreakerSettings, Window


class Clock:
    """A clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_call() -> Call:
    return Call(
        source="pricing", name="price", target="/prices/1", params={}, timeout=1.0, deadline=1e12
    )


def scripted():
    """A source whose next answer is set by the test: a value, or an exception to raise."""

    async def source(call: Call):
        source.calls += 1
        if isinstance(source.next, BaseException):
            raise source.next
        return source.next

    source.calls = 0
    source.next = "ok"
    return source


def gated():
    """A source that waits for its gate, then answers `ok` (or raises what the test set)."""

    async def source(call: Call):
        source.calls += 1
        await source.gate.wait()
        if isinstance(source.next, BaseException):
            raise source.next
        return "ok"

    source.calls = 0
    source.gate = asyncio.Event()
    source.next = None
    return source


def breaker(clock: Clock, changes: list | None = None, **cfg) -> Breaker:
    settings = {
        "failure_ratio": 0.5,
        "min_calls": 4,
        "window_s": 10,
        "open_ms": 5000,
        "half_open_calls": 1,
    } | cfg
    on_change = None if changes is None else (lambda *change: changes.append(change))
    return Breaker(BreakerSettings(**settings), "pricing", clock=clock, on_change=on_change)


async def outcome(guarded, call: Call | None = None) -> str:
    """Call once and return the result, or the outcome of the error raised."""
    try:
        return await guarded(call or make_call())
    except SourceError as exc:
        return exc.outcome


async def open_it(b: Breaker, source) -> None:
    source.next = SourceTimeout("slow")
    guarded = b(source)
    for _ in range(4):
        await outcome(guarded)
    assert b.state == "open"


async def test_breaker_stays_closed_below_min_calls() -> None:
    b = breaker(Clock(), min_calls=5)
    source = scripted()
    source.next = SourceTimeout("slow")
    for _ in range(4):
        assert await outcome(b(source)) == "timeout"
    assert b.state == "closed"


async def test_breaker_opens_when_failure_ratio_reached_after_min_calls() -> None:
    b = breaker(Clock())
    source = scripted()
    guarded = b(source)
    for answer in ("ok", "ok", BadPayload("garbage")):
        source.next = answer
        await outcome(guarded)
    assert b.state == "closed"
    source.next = SourceTimeout("slow")
    assert await outcome(guarded) == "timeout"
    assert b.state == "open"


async def test_breaker_stays_closed_below_failure_ratio() -> None:
    b = breaker(Clock())
    source = scripted()
    guarded = b(source)
    for answer in ("ok", "ok", "ok", SourceTimeout("slow"), "ok"):
        source.next = answer
        await outcome(guarded)
    assert b.state == "closed"


async def test_open_breaker_fails_fast_without_calling_the_source() -> None:
    b = breaker(Clock())
    source = scripted()
    await open_it(b, source)
    calls = source.calls
    source.next = "ok"
    for _ in range(10):
        with pytest.raises(CircuitOpen):
            await b(source)(make_call())
    assert source.calls == calls
    assert b.rejected == 10


async def test_breaker_half_opens_after_open_ms() -> None:
    clock = Clock()
    b = breaker(clock)
    await open_it(b, scripted())
    clock.now += 4.999
    assert b.state == "open"
    clock.now += 0.001
    assert b.state == "half_open"


async def test_half_open_closes_when_the_probe_succeeds_and_starts_a_fresh_window() -> None:
    clock = Clock()
    b = breaker(clock)
    source = scripted()
    await open_it(b, source)
    clock.now += 5
    source.next = "ok"
    assert await outcome(b(source)) == "ok"
    assert b.state == "closed"
    # The failures that opened it are forgotten: three more stay under min_calls.
    source.next = SourceTimeout("slow")
    for _ in range(3):
        await outcome(b(source))
    assert b.state == "closed"


async def test_half_open_reopens_when_a_probe_fails_for_another_open_ms() -> None:
    clock = Clock()
    b = breaker(clock)
    source = scripted()
    await open_it(b, source)
    clock.now += 5
    assert await outcome(b(source)) == "timeout"
    assert b.state == "open"
    clock.now += 4.9
    assert await outcome(b(source)) == "circuit_open"
    clock.now += 0.1
    assert b.state == "half_open"


async def test_half_open_lets_only_half_open_calls_probes_through_at_once() -> None:
    clock = Clock()
    b = breaker(clock, half_open_calls=2)
    await open_it(b, scripted())
    clock.now += 5
    source = gated()
    guarded = b(source)
    probes = [asyncio.create_task(guarded(make_call())) for _ in range(2)]
    await asyncio.sleep(0)
    assert source.calls == 2
    assert await outcome(guarded) == "circuit_open"
    assert source.calls == 2
    source.gate.set()
    assert await asyncio.gather(*probes) == ["ok", "ok"]
    assert b.state == "closed"


async def test_half_open_needs_every_probe_to_succeed_before_closing() -> None:
    clock = Clock()
    b = breaker(clock, half_open_calls=2)
    source = scripted()
    await open_it(b, source)
    clock.now += 5
    source.next = "ok"
    assert await outcome(b(source)) == "ok"
    assert b.state == "half_open"
    # The first probe's slot stays taken until the breaker decides: one more probe may pass.
    source.next = SourceTimeout("slow")
    assert await outcome(b(source)) == "timeout"
    assert b.state == "open"


async def test_cancelled_probe_releases_its_slot_without_deciding() -> None:
    clock = Clock()
    b = breaker(clock)
    await open_it(b, scripted())
    clock.now += 5
    source = gated()
    probe = asyncio.create_task(b(source)(make_call()))
    await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert b.state == "half_open"
    source.gate.set()
    assert await outcome(b(source)) == "ok"
    assert b.state == "closed"


async def test_overloaded_probe_releases_its_slot() -> None:
    clock = Clock()
    b = breaker(clock)
    source = scripted()
    await open_it(b, source)
    clock.now += 5
    source.next = Overloaded("full")
    assert await outcome(b(source)) == "overloaded"
    assert b.state == "half_open"
    source.next = "ok"
    assert await outcome(b(source)) == "ok"
    assert b.state == "closed"


async def test_not_found_counts_as_a_success() -> None:
    b = breaker(Clock())
    source = scripted()
    guarded = b(source)
    for answer in (NotFound("no"), NotFound("no"), NotFound("no"), SourceTimeout("slow")):
        source.next = answer
        await outcome(guarded)
    assert b.state == "closed"


@pytest.mark.parametrize("status", [400, 401, 403, 409, 422, 302])
async def test_a_refused_call_counts_as_a_success(status: int) -> None:
    b = breaker(Clock())
    source = scripted()
    guarded = b(source)
    source.next = SourceUnavailable(f"HTTP {status}", status=status)
    for _ in range(40):
        assert await outcome(guarded) == "error"
    source.next = SourceTimeout("slow")
    await outcome(guarded)
    assert b.state == "closed"  # 1 failure in 41 calls


@pytest.mark.parametrize(
    "failure",
    [
        SourceUnavailable("HTTP 500", status=500),
        SourceUnavailable("HTTP 503", status=503),
        SourceUnavailable("HTTP 429", status=429),
        SourceUnavailable("HTTP 408", status=408),
        SourceUnavailable("refused", connect=True),
        SourceUnavailable("reset"),
        BadPayload("not JSON"),
        SourceTimeout("slow"),
    ],
)
async def test_what_says_the_source_is_sick_opens_the_breaker(failure: SourceError) -> None:
    b = breaker(Clock())
    source = scripted()
    source.next = failure
    guarded = b(source)
    for _ in range(4):
        await outcome(guarded)
    assert b.state == "open"


async def test_a_refused_probe_closes_a_half_open_breaker() -> None:
    clock = Clock()
    b = breaker(clock)
    source = scripted()
    await open_it(b, source)
    clock.now += 5
    source.next = SourceUnavailable("HTTP 400", status=400)
    assert await outcome(b(source)) == "error"
    assert b.state == "closed"  # the source answered: it is up


@pytest.mark.parametrize(
    "uncounted",
    [SourceError("cannot bind a value"), Overloaded("full")],
    ids=["an_error_of_our_own_side", "overloaded"],
)
async def test_a_call_that_never_reached_the_source_is_no_verdict(uncounted: SourceError) -> None:
    # A value the driver refused to send (say), or a full pool, never reached the source: neither
    # says anything of it, so neither counts as a call.
    b = breaker(Clock())
    source = scripted()
    guarded = b(source)
    source.next = uncounted
    for _ in range(10):
        await outcome(guarded)
    source.next = SourceTimeout("slow")
    for _ in range(3):
        await outcome(guarded)
    assert b.state == "closed"  # 3 counted calls < min_calls 4
    await outcome(guarded)
    assert b.state == "open"


async def test_window_forgets_failures_older_than_window_s() -> None:
    clock = Clock()
    b = breaker(clock)
    source = scripted()
    source.next = SourceTimeout("slow")
    for _ in range(3):
        await outcome(b(source))
    clock.now += 11
    await outcome(b(source))
    assert b.state == "closed"


async def test_late_answer_from_before_opening_cannot_close_half_open() -> None:
    clock = Clock()
    b = breaker(clock)
    late = gated()
    old_call = asyncio.create_task(b(late)(make_call()))
    await asyncio.sleep(0)
    await open_it(b, scripted())
    clock.now += 5
    assert b.state == "half_open"
    late.gate.set()
    assert await old_call == "ok"
    assert b.state == "half_open"


async def test_on_change_reports_every_transition() -> None:
    clock = Clock()
    changes: list = []
    b = breaker(clock, changes)
    source = scripted()
    await open_it(b, source)
    clock.now += 5
    await outcome(b(source))  # probe fails
    clock.now += 5
    source.next = "ok"
    await outcome(b(source))  # probe succeeds
    assert changes == [
        ("pricing", "closed", "open"),
        ("pricing", "open", "half_open"),
        ("pricing", "half_open", "open"),
        ("pricing", "open", "half_open"),
        ("pricing", "half_open", "closed"),
    ]


def test_window_counts_only_the_last_window_s() -> None:
    clock = Clock()
    window = Window(10, clock)
    window.add(1, 1)
    clock.now += 5
    window.add(2, 0)
    assert window.counts() == (3, 1)
    clock.now += 5.5
    assert window.counts() == (2, 0)
    clock.now += 5
    assert window.counts() == (0, 0)


def test_window_clear_forgets_everything() -> None:
    window = Window(10, Clock())
    window.add(5, 5)
    window.clear()
    assert window.counts() == (0, 0)
