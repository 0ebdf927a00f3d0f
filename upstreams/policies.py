"""Per-call policies: functions from source to source, each adding one behaviour.

`gateway/core/plan.py` composes them for each source in one fixed order, outermost first:

    Breaker(retry(Hedge(timeout(Limit(source)))))

- the breaker is outermost so an open circuit fails at once without touching anything inside;
- retry sits outside hedge and timeout so each attempt (with its hedge) gets its own timeout;
- timeout sits outside the bulkhead so one attempt's clock covers everything below it;
- the bulkhead is innermost so it counts requests actually going to the source, hedges included.

Retries and hedges of one source share one `Budget`, so together they stay a small fraction of
that source's calls and an outage is never multiplied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)

from gateway.core.errors import (
    Overloaded,
    SourceError,
    SourceTimeout,
    SourceUnavailable,
    Unsendable,
)
from gateway.core.types import JSON, Call, Source
from upstreams.breaker import Breaker, Clock, Window

__all__ = ["Breaker", "Budget", "Hedge", "Limit", "Retry", "RetryAfter", "timeout"]

OnRetry = Callable[[Call, int], None]
OnHedge = Callable[[Call], None]


class RetryAfter(SourceUnavailable):
    """A failure status (429, 503) whose answer said how many seconds to wait before the next
    attempt (`Retry-After`): `Retry` waits that long instead of its backoff, or not at all."""

    def __init__(self, message: str, *, status: int, after_s: float) -> None:
        super().__init__(message, status=status)
        self.after_s = after_s


def timeout(source: Source) -> Source:
    """Return `source` bounded by `call.timeout` per attempt and by `call.deadline` overall."""

    async def timed(call: Call) -> JSON:
        loop = asyncio.get_running_loop()
        when = min(loop.time() + call.timeout, call.deadline)
        if when <= loop.time():
            raise SourceTimeout(f"{call.source}: no time left before the deadline")
        cm = asyncio.timeout_at(when)
        try:
            async with cm:
                return await source(call)
        except TimeoutError:
            # Only our own expiry is a timeout of the source; a TimeoutError from below is a bug
            # that must fail loudly, and an outer cancellation is not a TimeoutError at all.
            if cm.expired():
                raise SourceTimeout(f"{call.source}: no answer in time") from None
            raise

    return timed


class Limit:
    """A bulkhead: `Limit(n)(source)` runs at most `n` calls at once and fails the rest fast."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.rejected = 0

    def __call__(self, source: Source) -> Source:
        """Return `source` behind this bulkhead."""

        async def limited(call: Call) -> JSON:
            # Queueing would only spend the caller's deadline waiting; failing fast lets it
            # take its fallback now.
            if self.in_flight >= self.max_in_flight:
                self.rejected += 1
                raise Overloaded(f"{call.source}: {self.max_in_flight} calls already in flight")
            self.in_flight += 1
            try:
                return await source(call)
            finally:
                self.in_flight -= 1

        return limited


class Budget:
    """How many retries (and hedges) one source may still send: at most `ratio` of its calls.

    Calls and retries are counted over a sliding `window_s`; `min_retries` per window are always
    allowed so a source with little traffic can still retry.
    """

    def __init__(
        self,
        ratio: float,
        clock: Clock = time.monotonic,
        window_s: float = 10.0,
        min_retries: int = 3,
    ) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self._window = Window(window_s, clock)

    def record_call(self) -> None:
        """Count one call (not a retry) of the source."""
        self._window.add(1, 0)

    def spend(self) -> bool:
        """Take one retry from the budget; return False (and take nothing) when it is spent."""
        calls, retries = self._window.counts()
        if retries >= max(self.min_retries, self.ratio * calls):
            return False
        self._window.add(0, 1)
        return True


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Retries of one source's idempotent calls: how many, how far apart, on which outcomes."""

    attempts: int = 2
    backoff_ms: int = 10
    max_backoff_ms: int = 200
    jitter: bool = True
    on: tuple[str | int, ...] = ("timeout", "connect", 502, 503, 504)
    budget_ratio: float = 0.2


def retryable(on: tuple[str | int, ...]) -> Callable[[BaseException], bool]:
    """Return a predicate telling whether an error is one of the outcomes listed in `retry.on`."""
    statuses = frozenset(o for o in on if isinstance(o, int))

    def check(exc: BaseException) -> bool:
        if not isinstance(exc, SourceError):
            return False
        if (isinstance(exc, SourceUnavailable) and exc.refused) or isinstance(exc, Unsendable):
            return False  # the same call would be refused again, whatever `on` lists
        if isinstance(exc, SourceTimeout):
            return "timeout" in on
        if isinstance(exc, SourceUnavailable):
            if exc.connect and "connect" in on:
                return True
            if exc.status is not None and exc.status in statuses:
                return True
        # NotFound, CircuitOpen and Overloaded have their own outcomes and never get here.
        return exc.outcome == "error" and "error" in on

    return check


class Retry:
    """Retries of one source's idempotent calls, on the outcomes of `cfg.on`, with tenacity.

    A retry starts only when all of these hold, checked in this order:
    - fewer than `cfg.attempts` attempts were made;
    - the deadline can hold it: `call.deadline - loop.time() >= wait + call.timeout`, so a
      retry never starts that would be cut short by the deadline (counted in `refused_deadline`);
      the wait is the backoff, or the seconds an answer's `Retry-After` asked for (`RetryAfter`),
      so a source that asks for more time than is left fails the call at once;
    - the source's `Budget` has a retry left (counted in `refused_budget`).
    Otherwise the last error is raised as it is. Backoff is exponential from `backoff_ms`, capped
    at `max_backoff_ms`, with full jitter when `cfg.jitter`. With no retry config, plan.py can
    still use `Retry(RetrySettings(attempts=1), budget)` so a hedged source's calls are counted.
    """

    def __init__(
        self,
        cfg: RetrySettings,
        budget: Budget | None = None,
        clock: Clock = time.monotonic,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.budget = budget if budget is not None else Budget(cfg.budget_ratio, clock)
        self.on_retry = on_retry
        self.attempts = 0
        self.retries = 0
        self.refused_deadline = 0
        self.refused_budget = 0
        backoff = cfg.backoff_ms / 1000
        cap = cfg.max_backoff_ms / 1000
        self._backoff = (
            wait_random_exponential(multiplier=backoff, max=cap)
            if cfg.jitter
            else wait_exponential(multiplier=backoff, max=cap)
        )
        self._out_of_attempts = stop_after_attempt(cfg.attempts)
        self._retryable = retryable(cfg.on)
        self._retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def __call__(self, source: Source) -> Source:
        """Return `source` with retries."""

        async def attempt(call: Call) -> JSON:
            self.attempts += 1
            return await source(call)

        async def retried(call: Call) -> JSON:
            self.budget.record_call()
            self.attempts += 1
            try:
                return await source(call)
            except SourceError as exc:
                if not self._retryable(exc):
                    raise
                first = exc
            # Most calls succeed at once and never get here: tenacity's per-run machinery costs
            # more than a call's own work, so it only takes over once a retry is on the table,
            # replaying the first failure as its attempt 1.
            replayed = False

            async def resume(call: Call) -> JSON:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    raise first
                return await attempt(call)

            # A copy per call: tenacity keeps per-run state on the object.
            return await self._retrying.copy()(resume, call)

        return retried

    def _wait(self, state: RetryCallState) -> float:
        # Called before `_stop`, which judges this wait against the deadline.
        exc = None if state.outcome is None else state.outcome.exception()
        if isinstance(exc, RetryAfter):
            return exc.after_s
        return self._backoff(state)

    def _stop(self, state: RetryCallState) -> bool:
        if self._out_of_attempts(state):
            return True
        call: Call = state.args[0]
        remaining = call.deadline - asyncio.get_running_loop().time()
        if remaining < state.upcoming_sleep + call.timeout:
            self.refused_deadline += 1
            return True
        if not self.budget.spend():
            self.refused_budget += 1
            return True
        return False

    def _before_sleep(self, state: RetryCallState) -> None:
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry(state.args[0], state.attempt_number + 1)


class Hedge:
    """Hedged requests: a second attempt if the first has not answered after `after` seconds.

    `after` is a number or a function returning one (a live p95, say) or None (don't hedge). The
    first success wins and the other attempt is cancelled and awaited; if both fail, the first
    attempt's error is raised. A hedge is sent only when the remaining deadline still holds at
    least `after` (a hedge with less time than a typical answer is load with no gain) and the
    shared `Budget` has a retry left. Use only for idempotent calls.
    """

    def __init__(
        self,
        after: float | Callable[[], float | None],
        budget: Budget | None = None,
        on_hedge: OnHedge | None = None,
    ) -> None:
        self.after = after
        self.budget = budget
        self.on_hedge = on_hedge
        self.sent = 0
        self.won = 0

    def __call__(self, source: Source) -> Source:
        """Return `source` with hedging."""

        async def hedged(call: Call) -> JSON:
            delay = self.after() if callable(self.after) else self.after
            loop = asyncio.get_running_loop()
            if delay is None or loop.time() + 2 * delay > call.deadline:
                return await source(call)
            first = asyncio.ensure_future(source(call))
            tasks = [first]
            try:
                done, _ = await asyncio.wait(tasks, timeout=delay)
                if done or not self._may_hedge(call, delay):
                    return await first
                tasks.append(asyncio.ensure_future(source(call)))
                self.sent += 1
                if self.on_hedge is not None:
                    self.on_hedge(call)
                return await self._first_success(first, tasks[1])
            finally:
                await _cancel(tasks)

        return hedged

    def _may_hedge(self, call: Call, delay: float) -> bool:
        if call.deadline - asyncio.get_running_loop().time() < delay:
            return False
        return self.budget is None or self.budget.spend()

    async def _first_success(
        self, first: asyncio.Future[JSON], second: asyncio.Future[JSON]
    ) -> JSON:
        pending = {first, second}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in (first, second):
                if task not in done:
                    continue
                exc = task.exception()
                if exc is None:
                    if task is second:
                        self.won += 1
                    return task.result()
                if not isinstance(exc, SourceError):
                    raise exc  # a bug, not a failed attempt: fail loudly, don't wait it out

        return first.result()


async def _cancel(tasks: Sequence[asyncio.Future[JSON]]) -> None:
    """Cancel the attempts still running and wait until they are over, so none outlives the call."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # marks it retrieved: the error that lost is not worth a log line
