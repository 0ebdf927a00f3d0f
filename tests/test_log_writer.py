"""The process's own hygiene: log lines are written by a thread, so a sink that blocks never
stalls the event loop; and the event loop's lag is measured, so a stall is seen."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

from gateway.ops.diagnostics import LoopLag
from gateway.ops.log import LineWriter


class BlockingSink(io.StringIO):
    """A sink whose writes wait until `opened` is set: a pipe nobody reads, a disk in writeback."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()
        self.writes = 0

    def write(self, text: str) -> int:
        self.opened.wait(10)
        self.writes += 1
        return super().write(text)


def test_lines_wait_for_a_blocked_sink_without_blocking_the_caller() -> None:
    sink = BlockingSink()
    writer = LineWriter(sink)
    t0 = time.monotonic()
    for i in range(500):
        writer.info(f"line {i}")
    queued_in = time.monotonic() - t0
    assert sink.getvalue() == ""  # nothing could be written yet
    assert queued_in < 5  # bounded by nothing the sink does: it is still blocked (10 s)
    sink.opened.set()
    assert writer.flush(5)
    assert sink.getvalue().splitlines() == [f"line {i}" for i in range(500)]
    assert sink.writes < 500  # gathered lines go out together


def test_past_max_pending_lines_are_dropped_and_the_loss_is_written() -> None:
    sink = BlockingSink()
    writer = LineWriter(sink, max_pending=10)
    writer.info("first")  # the thread takes it and blocks writing it
    deadline = time.monotonic() + 5
    while writer._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(25):
        writer.warning(f"more {i}")
    assert writer.dropped == 15
    sink.opened.set()
    assert writer.flush(5)
    lines = sink.getvalue().splitlines()
    assert lines[:11] == ["first", *(f"more {i}" for i in range(10))]
    assert json.loads(lines[11]) == {"event": "log_lines_dropped", "count": 15}
    writer.info("after")
    assert writer.flush(5)
    # The loss was told once: the next batch carries no second count.
    assert sink.getvalue().splitlines()[-1] == "after" and writer.dropped == 15
    assert sink.getvalue().count("log_lines_dropped") == 1


async def test_loop_lag_sees_a_blocked_loop_and_counts_it_as_a_stall() -> None:
    seen: list[float] = []
    lag = LoopLag(every_s=0.01, stall_ms=100, on_lag=seen.append)
    lag.start()
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # noqa: ASYNC251 -- on purpose: the loop is blocked, the ticker wakes late
    await asyncio.sleep(0.05)
    await lag.stop()
    assert lag.worst_ms >= 190 and lag.stalls >= 1
    assert max(seen) * 1000 == lag.worst_ms and len(seen) >= 3
    report = lag.report()
    assert report["stalls"] == lag.stalls and report["stall_ms"] == 100
