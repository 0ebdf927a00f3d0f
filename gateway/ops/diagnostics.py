"""What the process itself holds and how it runs: asyncio tasks, resident memory, how late its
event loop runs what is due and, when asked for with `GATEWAY_TRACEMALLOC=1`, tracemalloc's top
allocation sites (for the soak and leak hunts)."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("gateway.process")

TRACEMALLOC_ENV = "GATEWAY_TRACEMALLOC"

_IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def start_tracing_from_env() -> bool:
    """Start tracemalloc (one frame per allocation) when `GATEWAY_TRACEMALLOC=1`; return whether
    it is tracing now."""
    if os.environ.get(TRACEMALLOC_ENV) == "1" and not tracemalloc.is_tracing():
        tracemalloc.start(1)
    return tracemalloc.is_tracing()


def rss_kb() -> int | None:
    """Return this process's resident set size in KiB (Linux `/proc`), or None elsewhere."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def process_report(lag: LoopLag | None = None) -> dict[str, Any]:
    """Return the pid, the number of asyncio tasks alive in this loop, the RSS in KiB and, given
    the loop's `LoopLag`, how late it has run."""
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "tasks": len(asyncio.all_tasks()),
        "rss_kb": rss_kb(),
    }
    if lag is not None:
        report["loop_lag_ms"] = lag.report()
    return report


class LoopLag:
    """How late this event loop runs what is due: a ticker every `every_s` measures by how much
    it woke late. A late loop delays every request on it alike (a CPU-starved process, a
    blocking call, a long collection), which no per-source figure shows.

    `on_lag(seconds)`, when given, gets every measurement (the gateway's histogram); a lag past
    `stall_ms` is a stall: counted, and logged at most once per `warn_every_s`.
    """

    def __init__(
        self,
        every_s: float = 0.025,
        stall_ms: float = 20.0,
        on_lag: Callable[[float], None] | None = None,
        warn_every_s: float | None = None,
    ) -> None:
        self.every_s = every_s
        self.stall_ms = stall_ms
        self.on_lag = on_lag
        self.warn_every_s = warn_every_s
        self.worst_ms = 0.0
        self.stalls = 0
        self._warned_at = float("-inf")
        self._unwarned = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start ticking on the running loop."""
        self._task = asyncio.create_task(self._tick(), name="loop-lag")

    async def stop(self) -> None:
        """Stop ticking."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def report(self) -> dict[str, float | int]:
        """Return the worst lag seen and how many stalls (lags past `stall_ms`)."""
        return {"worst": round(self.worst_ms, 1), "stall_ms": self.stall_ms, "stalls": self.stalls}

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.every_s
            await asyncio.sleep(self.every_s)
            late = max(0.0, loop.time() - due)
            self.measured(late)

    def measured(self, late_s: float) -> None:
        """Record one measurement of `late_s` seconds."""
        late_ms = late_s * 1000
        self.worst_ms = max(self.worst_ms, late_ms)
        if self.on_lag is not None:
            self.on_lag(late_s)
        if late_ms <= self.stall_ms:
            return
        self.stalls += 1
        if self.warn_every_s is None:
            return
        now = time.monotonic()
        if now - self._warned_at < self.warn_every_s:
            self._unwarned += 1
            return
        log.warning("event_loop_stalled", ms=round(late_ms, 1), suppressed=self._unwarned)
        self._warned_at = now
        self._unwarned = 0


def memory_report(limit: int) -> dict[str, Any] | None:
    """Return tracemalloc's totals and its `limit` largest allocation sites (by file and line),
    or None when tracemalloc is not tracing."""
    if not tracemalloc.is_tracing():
        return None
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot().filter_traces(_IGNORED)
    top = snapshot.statistics("lineno")[:limit]
    return {
        "traced_bytes": current,
        "peak_bytes": peak,
        "rss_kb": rss_kb(),
        "top": [
            {
                "site": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                "bytes": s.size,
                "count": s.count,
            }
            for s in top
        ],
    }
