"""What the process itself holds: asyncio tasks, resident memory and, when asked for with
`GATEWAY_TRACEMALLOC=1`, tracemalloc's top allocation sites (for the soak and leak hunts)."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from typing import Any

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


def process_report() -> dict[str, Any]:
    """Return the pid, the number of asyncio tasks alive in this loop, and the RSS in KiB."""
    return {"pid": os.getpid(), "tasks": len(asyncio.all_tasks()), "rss_kb": rss_kb()}


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
