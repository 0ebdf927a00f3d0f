"""A source's live latency for the policies that need one (hedging `after: p95`).

Kept here, beside the policies, rather than read from the operators' statistics
(`gateway/ops/stats.py`): the hedge only needs a function returning seconds or None, so whichever
tracker feeds it can be swapped without touching the policy.
"""

from __future__ import annotations

import math
import time
from collections import deque

from gateway.core.types import JSON, Call, Source
from upstreams.breaker import Clock


class Latency:
    """The durations of a source's last `size` successful attempts, and their quantiles.

    `Latency()(source)` is `source` with each successful attempt recorded. Failures are left
    out on purpose: a timeout says how long we waited, not how long the source takes, and a
    fast error would pull the percentiles down. Until `min_samples` are in, there is no answer.
    """

    def __init__(
        self, size: int = 200, min_samples: int = 20, clock: Clock = time.perf_counter
    ) -> None:
        self.min_samples = min_samples
        self._clock = clock
        self._ring: deque[float] = deque(maxlen=size)
        self._sorted: list[float] | None = None

    def record(self, seconds: float) -> None:
        """Add one successful attempt's duration, dropping the oldest when the ring is full."""
        self._ring.append(seconds)
        self._sorted = None

    def quantile(self, q: float) -> float | None:
        """Return the `q` quantile (nearest rank) in seconds, or None while samples are too few."""
        if len(self._ring) < self.min_samples:
            return None
        if self._sorted is None:
            # Sorted at most once per recorded attempt, and the ring is small.
            self._sorted = sorted(self._ring)
        rank = min(max(math.ceil(q * len(self._sorted)), 1), len(self._sorted))
        return self._sorted[rank - 1]

    def __call__(self, source: Source) -> Source:
        """Return `source` with the duration of each of its successful attempts recorded."""

        async def timed(call: Call) -> JSON:
            start = self._clock()
            result = await source(call)
            self.record(self._clock() - start)
            return result

        return timed
