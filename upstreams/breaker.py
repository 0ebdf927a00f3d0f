"""A circuit breaker per source, and the bucketed sliding window it and the retry budget count in.

States: `closed` (calls pass, outcomes are counted), `open` (calls fail at once with
`CircuitOpen`), `half_open` (a few probes pass; all succeed -> closed, one fails -> open).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.errors import (
    BadPayload,
    CircuitOpen,
    NotFound,
    SourceError,
    SourceTimeout,
    SourceUnavailable,
)
from gateway.core.types import JSON, Call, Source

Clock = Callable[[], float]
OnChange = Callable[[str, str, str], None]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def verdict(exc: SourceError) -> bool | None:
    """Return True when a failure says the source is sick, False when it says the source answered
    (a 404, a refused call: a 3xx or 4xx but 408 and 429), None when it says nothing about it.

    Sick: timeouts, connect failures, resets, 5xx, 408, 429, unusable bodies. Nothing a client
    can cause by what it asks for counts, or any client could open the breaker for everyone;
    `overloaded`, `circuit_open` and values the driver refused to send come from our side.
    """
    if isinstance(exc, SourceUnavailable):
        return not exc.refused
    if isinstance(exc, SourceTimeout | BadPayload):
        return True
    if isinstance(exc, NotFound):
        return False
    return None


class Window:
    """Counts of events, and of hits among them, over the last `seconds`, in O(1) memory.

    Time is cut into `buckets` slots of `seconds / buckets`; a slot is reused (and reset) once
    its time has left the window, so the covered span is between `seconds - width` and `seconds`.
    """

    def __init__(self, seconds: float, clock: Clock = time.monotonic, buckets: int = 10) -> None:
        self._width = seconds / buckets
        self._clock = clock
        self._epochs = [-1] * buckets
        self._events = [0] * buckets
        self._hits = [0] * buckets

    def add(self, events: int = 1, hits: int = 0) -> None:
        """Count `events` and `hits` now."""
        epoch = int(self._clock() // self._width)
        slot = epoch % len(self._epochs)
        if self._epochs[slot] != epoch:
            self._epochs[slot], self._events[slot], self._hits[slot] = epoch, 0, 0
        self._events[slot] += events
        self._hits[slot] += hits

    def counts(self) -> tuple[int, int]:
        """Return (events, hits) counted within the window."""
        oldest = int(self._clock() // self._width) - len(self._epochs)
        events = hits = 0
        for slot, epoch in enumerate(self._epochs):
            if epoch > oldest:
                events += self._events[slot]
                hits += self._hits[slot]
        return events, hits

    def clear(self) -> None:
        """Forget everything counted so far."""
        self._epochs = [-1] * len(self._epochs)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a source's breaker opens (failure ratio over a window), and for how long."""

    failure_ratio: float = 0.5
    min_calls: int = 20
    window_s: int = 10
    open_ms: int = 5000
    half_open_calls: int = 1


class Breaker:
    """A circuit breaker policy for one source: `Breaker(cfg, name)(source)` is the guarded source.

    Every state change bumps a generation; a call only moves the breaker if it started in the
    current generation, so late answers from before a change (say, slow calls that were already
    running when it opened) can neither close a half-open breaker nor count in a fresh window.
    """

    def __init__(
        self,
        cfg: BreakerSettings,
        name: str,
        clock: Clock = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self.name = name
        self.rejected = 0
        self._cfg = cfg
        self._clock = clock
        self._on_change = on_change
        self._window = Window(cfg.window_s, clock)
        self._state = CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._probes = 0  # half-open probe slots taken (running or succeeded)
        self._passed = 0  # half-open probes that succeeded

    @property
    def state(self) -> str:
        """The current state, `open` having become `half_open` once `open_ms` has passed."""
        self._tick()
        return self._state

    def __call__(self, source: Source) -> Source:
        """Return `source` behind this breaker."""

        async def guarded(call: Call) -> JSON:
            generation = self._admit(call)
            try:
                result = await source(call)
            except SourceError as exc:
                failed = verdict(exc)
                if failed is None:
                    self._release(generation)
                else:
                    self._record(generation, failed=failed)
                raise
            except BaseException:
                # Cancelled (or a bug): no verdict on the source, but give back the probe slot.
                self._release(generation)
                raise
            self._record(generation, failed=False)
            return result

        return guarded

    def _tick(self) -> None:
        if self._state == OPEN and self._clock() - self._opened_at >= self._cfg.open_ms / 1000:
            self._move(HALF_OPEN)

    def _admit(self, call: Call) -> int:
        self._tick()
        if self._state == HALF_OPEN and self._probes < self._cfg.half_open_calls:
            self._probes += 1
        elif self._state != CLOSED:
            self.rejected += 1
            raise CircuitOpen(f"{call.source}: circuit open")
        return self._generation

    def _record(self, generation: int, *, failed: bool) -> None:
        if generation != self._generation:
            return
        if self._state == CLOSED:
            self._window.add(1, int(failed))
            calls, failures = self._window.counts()
            if (
                failed
                and calls >= self._cfg.min_calls
                and failures >= self._cfg.failure_ratio * calls
            ):
                self._move(OPEN)
        elif failed:
            self._move(OPEN)
        else:
            self._passed += 1
            if self._passed >= self._cfg.half_open_calls:
                self._move(CLOSED)

    def _release(self, generation: int) -> None:
        if generation == self._generation and self._state == HALF_OPEN:
            self._probes -= 1

    def _move(self, new: str) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._probes = self._passed = 0
        if new == OPEN:
            self._opened_at = self._clock()
        elif new == CLOSED:
            self._window.clear()
        if self._on_change is not None:
            self._on_change(self.name, old, new)
