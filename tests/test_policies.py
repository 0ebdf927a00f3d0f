"""Per-call policies: timeout, bulkhead, retry with its budget, hedging, and their composition.

Timeouts and hedges run on real asyncio time with small durations and generous upper bounds;
the retry budget runs on an injected clock.
"""

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
    Unsendable,
)
from gateway.core.types import Call
from tests.support import counted, failing, ok, slow
from upstreams.breaker import BreakerSettings
from upstreams.policies import Breaker, Budget, Hedge, Limit, Retry, RetrySettings, timeout

# --- fakes ----------------------------------------------------------------------------------


def flaky(n_failures, exc, data="ok"):
    async def body(call, n):
        if n <= n_failures:
            raise exc
        return data

    return counted(body)


def tracked(seconds, data="ok"):
    """A slow source that records, per invocation, whether it finished or was cancelled."""

    async def body(call, n):
        try:
            await asyncio.sleep(seconds)
            return data
        finally:
            source.ended.append(n)

    source = counted(body)
    source.ended = []
    return source


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_call(timeout: float = 1.0, budget: float = 5.0) -> Call:
    deadline = asyncio.get_running_loop().time() + budget
    return Call(
        source="pricing",
        name="price",
        target="/prices/1",
        params={},
        timeout=timeout,
        deadline=deadline,
    )


def retry_cfg(**cfg) -> RetrySettings:
    return RetrySettings(**({"attempts": 3, "backoff_ms": 0, "jitter": False} | cfg))


def now() -> float:
    return asyncio.get_running_loop().time()


# --- timeout --------------------------------------------------------------------------------


async def test_timeout_returns_a_fast_answer() -> None:
    assert await timeout(ok({"a": 1}))(make_call()) == {"a": 1}


async def test_timeout_turns_a_slow_source_into_source_timeout() -> None:
    start = now()
    with pytest.raises(SourceTimeout):
        await timeout(slow(5))(make_call(timeout=0.05))
    assert now() - start < 1.0


async def test_timeout_is_capped_by_the_deadline() -> None:
    start = now()
    with pytest.raises(SourceTimeout):
        await timeout(slow(5))(make_call(timeout=5, budget=0.05))
    assert now() - start < 1.0


async def test_timeout_fails_at_once_past_the_deadline_without_calling() -> None:
    source = ok()
    with pytest.raises(SourceTimeout):
        await timeout(source)(make_call(budget=-0.01))
    assert source.calls == 0


async def test_timeout_covers_time_spent_in_inner_layers() -> None:
    def waits_first(seconds):
        """A layer that waits before calling on, like a pool handing out a connection."""

        def policy(source):
            async def waiting(call):
                await asyncio.sleep(seconds)
                return await source(call)

            return waiting

        return policy

    source = ok()
    start = now()
    with pytest.raises(SourceTimeout):
        await timeout(waits_first(5)(Limit(10)(source)))(make_call(timeout=0.05))
    assert now() - start < 1.0
    assert source.calls == 0


async def test_outer_cancellation_is_not_turned_into_source_timeout() -> None:
    task = asyncio.create_task(timeout(slow(5))(make_call()))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_outer_timeout_is_not_turned_into_source_timeout() -> None:
    with pytest.raises(TimeoutError) as info:
        async with asyncio.timeout(0.02):
            await timeout(slow(5))(make_call())
    assert not isinstance(info.value, SourceError)


async def test_timeout_error_from_below_fails_loudly() -> None:
    with pytest.raises(TimeoutError) as info:
        await timeout(failing(TimeoutError()))(make_call())
    assert not isinstance(info.value, SourceError)


# --- limit ----------------------------------------------------------------------------------


async def test_limit_fails_fast_past_max_in_flight() -> None:
    gate = asyncio.Event()

    async def body(call, n):
        await gate.wait()
        return n

    source = counted(body)
    limit = Limit(2)
    limited = limit(source)
    running = [asyncio.create_task(limited(make_call())) for _ in range(2)]
    await asyncio.sleep(0)
    assert limit.in_flight == 2
    with pytest.raises(Overloaded):
        await limited(make_call())
    assert source.calls == 2
    assert limit.rejected == 1
    gate.set()
    assert sorted(await asyncio.gather(*running)) == [1, 2]
    assert limit.in_flight == 0
    assert await limited(make_call()) == 3


async def test_limit_frees_its_slot_after_a_failure_or_a_cancellation() -> None:
    limit = Limit(1)
    with pytest.raises(BadPayload):
        await limit(failing(BadPayload("garbage")))(make_call())
    task = asyncio.create_task(limit(slow(5))(make_call()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limit.in_flight == 0
    assert await limit(ok())(make_call()) == "ok"


# --- retry ----------------------------------------------------------------------------------


async def test_retry_retries_a_listed_outcome_until_success() -> None:
    source = flaky(2, SourceTimeout("slow"), {"a": 1})
    retry = Retry(retry_cfg())
    assert await retry(source)(make_call()) == {"a": 1}
    assert source.calls == 3
    assert (retry.attempts, retry.retries) == (3, 2)


async def test_retry_stops_after_attempts_and_raises_the_last_error_itself() -> None:
    error = SourceUnavailable("bad gateway", status=502)
    source = failing(error)
    with pytest.raises(SourceUnavailable) as info:
        await Retry(retry_cfg(attempts=3))(source)(make_call())
    assert info.value is error
    assert source.calls == 3


@pytest.mark.parametrize(
    ("on", "error", "calls"),
    [
        (("timeout",), SourceTimeout("slow"), 2),
        (("connect",), SourceTimeout("slow"), 1),
        (("connect",), SourceUnavailable("refused", connect=True), 2),
        (("timeout",), SourceUnavailable("refused", connect=True), 1),
        ((502, 503), SourceUnavailable("bad gateway", status=502), 2),
        ((502, 503), SourceUnavailable("internal", status=500), 1),
        ((502, 503), BadPayload("garbage"), 1),
        (("error",), BadPayload("garbage"), 2),
        (("error",), SourceUnavailable("internal", status=500), 2),
        (("error",), SourceTimeout("slow"), 1),
        (("timeout", "connect", "error", 500, 502, 503, 504, 429), NotFound("no"), 1),
        (("error", 500, 502, 503, 504, 429), SourceUnavailable("bad", status=400), 1),
        (("error", 500, 502, 503, 504, 429), SourceUnavailable("who", status=401), 1),
        (("error", 500, 502, 503, 504, 429), SourceUnavailable("moved", status=302), 1),
        (("error",), SourceUnavailable("request timeout", status=408), 2),
        ((429,), SourceUnavailable("slow down", status=429), 2),
        (("error",), SourceUnavailable("reset"), 2),
        (("timeout", "connect", "error", 500, 502, 503, 504, 429), CircuitOpen("open"), 1),
        (("timeout", "connect", "error", 500, 502, 503, 504, 429), Overloaded("full"), 1),
        # The same value would be refused by the driver again.
        (("timeout", "connect", "error"), Unsendable("cannot encode"), 1),
    ],
)
async def test_retry_retries_only_the_listed_outcomes(on, error, calls) -> None:
    source = failing(error)
    with pytest.raises(type(error)):
        await Retry(retry_cfg(attempts=2, on=on))(source)(make_call())
    assert source.calls == calls


async def test_retry_lets_a_bug_through_untouched() -> None:
    source = failing(ZeroDivisionError())
    with pytest.raises(ZeroDivisionError):
        await Retry(retry_cfg(on=("timeout", "connect", "error")))(source)(make_call())
    assert source.calls == 1


async def test_retry_refuses_a_retry_the_remaining_budget_cannot_hold() -> None:
    source = failing(SourceTimeout("slow"))
    retry = Retry(retry_cfg(attempts=3))
    call = make_call(timeout=1.0, budget=0.5)
    with pytest.raises(SourceTimeout):
        await retry(source)(call)
    assert source.calls == 1
    assert retry.refused_deadline == 1


async def test_retry_counts_the_backoff_against_the_deadline() -> None:
    # First retry needs 0.1 s backoff + 0.05 s timeout and fits in 0.3 s; the second would need
    # 0.2 + 0.05 with about 0.2 left, so it is refused and the call ends before its deadline.
    source = failing(SourceTimeout("slow"))
    retry = Retry(retry_cfg(attempts=5, backoff_ms=100, max_backoff_ms=1000))
    call = make_call(timeout=0.05, budget=0.3)
    with pytest.raises(SourceTimeout):
        await retry(source)(call)
    assert source.calls == 2
    assert retry.refused_deadline == 1
    assert now() < call.deadline


async def test_retry_backs_off_exponentially_up_to_the_cap() -> None:
    source = failing(SourceTimeout("slow"))
    start = now()
    with pytest.raises(SourceTimeout):
        await Retry(retry_cfg(attempts=4, backoff_ms=20, max_backoff_ms=30))(source)(make_call())
    # Waits of 20, 30 (capped from 40) and 30 (capped from 80) ms.
    assert 0.075 <= now() - start < 1.0
    assert source.calls == 4


async def test_retry_with_jitter_never_waits_past_the_cap() -> None:
    source = failing(SourceTimeout("slow"))
    start = now()
    cfg = retry_cfg(attempts=4, backoff_ms=20, max_backoff_ms=30, jitter=True)
    with pytest.raises(SourceTimeout):
        await Retry(cfg)(source)(make_call())
    assert now() - start < 1.0
    assert source.calls == 4


async def test_retry_budget_caps_retries_at_budget_ratio_of_calls() -> None:
    source = failing(SourceUnavailable("down", status=503))
    retry = Retry(retry_cfg(attempts=2, budget_ratio=0.2), clock=Clock())
    retried = retry(source)
    for _ in range(100):
        with pytest.raises(SourceUnavailable):
            await retried(make_call())
    assert 15 <= retry.retries <= 20 + 3
    assert source.calls == 100 + retry.retries
    assert retry.refused_budget == 100 - retry.retries


async def test_retry_budget_allows_a_few_retries_at_low_traffic_and_refills() -> None:
    clock = Clock()
    source = failing(SourceTimeout("slow"))
    retry = Retry(retry_cfg(attempts=2, budget_ratio=0.0), clock=clock)
    retried = retry(source)
    for _ in range(5):
        with pytest.raises(SourceTimeout):
            await retried(make_call())
    assert retry.retries == 3
    clock.now += 11
    with pytest.raises(SourceTimeout):
        await retried(make_call())
    assert retry.retries == 4


async def test_retry_reports_each_retry_to_its_hook() -> None:
    seen = []
    retry = Retry(retry_cfg(attempts=3), on_retry=lambda call, attempt: seen.append(attempt))
    call = make_call()
    with pytest.raises(SourceTimeout):
        await retry(failing(SourceTimeout("slow")))(call)
    assert seen == [2, 3]


async def test_retry_does_not_retry_a_cancelled_call() -> None:
    source = slow(5)
    task = asyncio.create_task(Retry(retry_cfg())(source)(make_call()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.calls == 1


async def test_retry_runs_concurrent_calls_independently() -> None:
    sources = [flaky(1, SourceTimeout("slow"), i) for i in range(5)]
    retry = Retry(retry_cfg(budget_ratio=1.0))
    results = await asyncio.gather(*(retry(s)(make_call()) for s in sources))
    assert results == [0, 1, 2, 3, 4]
    assert [s.calls for s in sources] == [2] * 5


# --- hedge ----------------------------------------------------------------------------------


def first_slow_then_fast(first_s, second_s, first_exc=None, second_exc=None):
    """A source whose first invocation and later ones take different times and outcomes."""

    async def body(call, n):
        try:
            await asyncio.sleep(first_s if n == 1 else second_s)
            exc = first_exc if n == 1 else second_exc
            if exc is not None:
                raise exc
            return f"attempt {n}"
        finally:
            source.ended.append((n, asyncio.current_task().cancelling() > 0))

    source = counted(body)
    source.ended = []
    return source


async def test_hedge_fast_second_attempt_wins_and_the_slow_one_is_cancelled() -> None:
    source = first_slow_then_fast(5, 0.01)
    hedge = Hedge(0.03)
    start = now()
    assert await hedge(source)(make_call()) == "attempt 2"
    assert now() - start < 0.5
    assert (hedge.sent, hedge.won) == (1, 1)
    assert sorted(source.ended) == [(1, True), (2, False)]


async def test_hedge_is_not_sent_when_the_first_attempt_answers_in_time() -> None:
    source = ok()
    hedge = Hedge(0.05)
    assert await hedge(source)(make_call()) == "ok"
    assert source.calls == 1
    assert hedge.sent == 0


async def test_hedge_first_attempt_can_still_win_after_the_hedge_was_sent() -> None:
    source = first_slow_then_fast(0.05, 5)
    hedge = Hedge(0.02)
    assert await hedge(source)(make_call()) == "attempt 1"
    assert (hedge.sent, hedge.won) == (1, 0)
    assert sorted(source.ended) == [(1, False), (2, True)]


async def test_hedge_takes_the_second_answer_when_the_first_attempt_fails() -> None:
    source = first_slow_then_fast(0.05, 0.1, first_exc=SourceUnavailable("down", status=503))
    assert await Hedge(0.02)(source)(make_call()) == "attempt 2"


async def test_hedge_raises_the_first_attempts_error_when_both_fail() -> None:
    source = first_slow_then_fast(
        0.05, 0.0, first_exc=SourceUnavailable("first", status=503), second_exc=BadPayload("second")
    )
    with pytest.raises(SourceUnavailable, match="first"):
        await Hedge(0.02)(source)(make_call())
    assert source.calls == 2


async def test_hedge_raises_a_fast_first_failure_without_hedging() -> None:
    source = failing(BadPayload("garbage"))
    hedge = Hedge(0.05)
    with pytest.raises(BadPayload):
        await hedge(source)(make_call())
    assert (source.calls, hedge.sent) == (1, 0)


async def test_hedge_lets_a_bug_in_an_attempt_fail_loudly() -> None:
    source = first_slow_then_fast(5, 0.0, second_exc=ZeroDivisionError())
    with pytest.raises(ZeroDivisionError):
        await Hedge(0.02)(source)(make_call())
    assert sorted(source.ended) == [(1, True), (2, False)]


async def test_hedge_after_none_means_no_hedge() -> None:
    source = slow(0.05)
    hedge = Hedge(lambda: None)
    assert await hedge(source)(make_call()) == "ok"
    assert (source.calls, hedge.sent) == (1, 0)


async def test_hedge_reads_a_live_delay_each_call() -> None:
    delays = iter([0.01, None])
    hedge = Hedge(lambda: next(delays))
    await hedge(slow(0.05))(make_call())
    await hedge(slow(0.05))(make_call())
    assert hedge.sent == 1


async def test_hedge_is_not_sent_when_the_deadline_leaves_no_room() -> None:
    source = slow(0.05)
    hedge = Hedge(0.03)  # a hedge at 0.03 s would have less than 0.03 s left
    assert await hedge(source)(make_call(budget=0.055)) == "ok"
    assert (source.calls, hedge.sent) == (1, 0)


async def test_hedges_spend_the_retry_budget() -> None:
    budget = Budget(0.0, Clock(), min_retries=1)
    hedge = Hedge(0.01, budget=budget)
    await hedge(slow(0.04))(make_call())
    await hedge(slow(0.04))(make_call())
    assert hedge.sent == 1
    assert not budget.spend()


async def test_hedge_reports_each_hedge_to_its_hook() -> None:
    seen = []
    call = make_call()
    await Hedge(0.01, on_hedge=seen.append)(slow(0.04))(call)
    assert seen == [call]


async def test_cancelling_a_hedged_call_cancels_and_awaits_both_attempts() -> None:
    source = tracked(5)
    task = asyncio.create_task(Hedge(0.01)(source)(make_call()))
    await asyncio.sleep(0.05)
    assert source.calls == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(source.ended) == [1, 2]


# --- composition, in plan.py's fixed order --------------------------------------------------


def compose(source, breaker, retry, hedge, limit):
    return breaker(retry(hedge(timeout(limit(source)))))


async def test_open_breaker_never_calls_the_inner_layers() -> None:
    clock = Clock()
    breaker = Breaker(BreakerSettings(min_calls=2, failure_ratio=0.5), "pricing", clock=clock)
    retry = Retry(retry_cfg(attempts=2), clock=clock)
    hedge = Hedge(0.5)
    limit = Limit(1)
    source = failing(SourceUnavailable("down", status=503))
    guarded = compose(source, breaker, retry, hedge, limit)
    for _ in range(2):
        with pytest.raises(SourceUnavailable):
            await guarded(make_call())
    assert breaker.state == "open"
    calls, attempts = source.calls, retry.attempts
    for _ in range(20):
        with pytest.raises(CircuitOpen):
            await guarded(make_call())
    assert (source.calls, retry.attempts, limit.rejected) == (calls, attempts, 0)
    assert breaker.rejected == 20


async def test_composed_call_never_outlives_its_deadline() -> None:
    clock = Clock()
    breaker = Breaker(BreakerSettings(), "pricing", clock=clock)
    retry = Retry(retry_cfg(attempts=10), clock=clock)
    hedge = Hedge(0.02, budget=retry.budget)
    source = tracked(5)
    guarded = compose(source, breaker, retry, hedge, Limit(10))
    call = make_call(timeout=0.06, budget=0.25)
    start = now()
    with pytest.raises(SourceTimeout):
        await guarded(call)
    assert now() <= call.deadline + 0.05
    assert now() - start < 0.5
    assert retry.retries >= 1
    assert hedge.sent >= 1
    assert len(source.ended) == source.calls  # every attempt, hedges included, is over


async def test_composed_call_recovers_with_a_retry_inside_the_deadline() -> None:
    source = flaky(1, SourceUnavailable("refused", connect=True), {"amount": 1})
    retry = Retry(retry_cfg(attempts=2))
    guarded = compose(source, Breaker(BreakerSettings(), "pricing"), retry, Hedge(0.5), Limit(4))
    assert await guarded(make_call(timeout=0.1, budget=0.3)) == {"amount": 1}
    assert source.calls == 2
