"""Structured logs: structlog set up once, and the pure-ASGI middleware that writes access lines."""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.core.context import RequestContext, begin_trace, current


def configure(fmt: str | None = None, level: int | None = None) -> None:
    """Set up structlog: JSON lines, or a readable console with `GATEWAY_LOG_FORMAT=console`;
    `GATEWAY_LOG_LEVEL=warning` drops the per-request access lines (info)."""
    fmt = fmt or os.environ.get("GATEWAY_LOG_FORMAT", "json")
    if level is None:
        name = os.environ.get("GATEWAY_LOG_LEVEL", "info").upper()
        level = logging.getLevelNamesMapping().get(name, logging.INFO)
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_json)
    )
    structlog.configure(
        processors=[
            add_request_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _writer_for(sys.stderr),
        # Not cached: a cached logger would escape later reconfiguration (and capture_logs).
        cache_logger_on_first_use=False,
    )


class LineWriter:
    """A structlog logger whose lines a thread writes: a slow sink (a pipe nobody drains fast
    enough, a disk in writeback) stalls that thread, never the event loop and every request on it.

    The event loop only appends to a queue. The thread wakes at the first line, lets the lines
    of the next `gather_s` gather, and writes them in one call.
    Past `max_pending` lines waiting, new lines are dropped and counted, and the count is
    written as soon as the sink takes lines again: memory stays bounded, the loss is said.
    """

    def __init__(self, file: TextIO, max_pending: int = 20_000, gather_s: float = 0.01) -> None:
        self.file = file
        self.max_pending = max_pending
        self.gather_s = gather_s
        self.dropped = 0  # lines dropped since the start; only the callers' thread adds to it
        self._reported = 0  # of those, how many a log_lines_dropped line has told; the writer's
        self._queue: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def msg(self, message: str) -> None:
        """Queue one line (the rendered event) for the writer thread."""
        if self._thread is None:
            self._start()
        if self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            return
        self._queue.put(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until every line queued so far is written; return False if `timeout_s` passed."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout_s)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._thread.start()

    def _forked(self) -> None:
        # A forked child has the queue but not the thread: it starts its own on its first line.
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._start_lock = threading.Lock()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]  # idle: wait for the first line
            # Then let more gather: while this thread sleeps, a line costs its caller a bare
            # append, not a wake-up of this thread (and the GIL hand-over that comes with it).
            time.sleep(self.gather_s)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines = [item for item in batch if isinstance(item, str)]
            dropped = self.dropped
            if dropped > self._reported:
                count = dropped - self._reported
                lines.append(_json({"event": "log_lines_dropped", "count": count}))
                self._reported = dropped
            if lines:
                try:
                    self.file.write("\n".join(lines) + "\n")
                    self.file.flush()
                except (OSError, ValueError):
                    pass  # A closed or broken sink: nothing to tell it, and no caller to fail.
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()


_writers: dict[int, LineWriter] = {}


def _writer_for(file: TextIO) -> LineWriter:
    """Return the one writer of `file` (loggers are made per call: they share it)."""
    writer = _writers.get(id(file))
    if writer is None or writer.file is not file:
        writer = _writers[id(file)] = LineWriter(file)
    return writer


def flush(timeout_s: float = 2.0) -> None:
    """Write out every log line queued so far (at shutdown, and before reading a log)."""
    for writer in list(_writers.values()):
        writer.flush(timeout_s)


def _forked() -> None:
    for writer in _writers.values():
        writer._forked()


atexit.register(flush)
os.register_at_fork(after_in_child=_forked)


def _json(event: Any, **_: Any) -> str:
    # orjson: the access line is written once per request, so its encoding is on the hot path.
    return orjson.dumps(event, default=repr).decode()


def add_request_id(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Processor: add the current request's id (inherited by every task of its fan-out)."""
    info = current.get()
    if info is not None:
        event.setdefault("request_id", info.request_id)
    return event


_REQUEST_ID = b"x-request-id"


_VISIBLE_ID = re.compile(rb"[\x21-\x7e]{1,128}")
"""A client's request id is kept only when it is 1-128 visible ASCII characters: it lands in our
logs and in every upstream call's headers, which some HTTP clients can only encode as ASCII."""


def _request_id(scope: Scope) -> str:
    """Return the client's `X-Request-ID` when it is short visible ASCII, else a new id."""
    for name, value in scope["headers"]:
        if name == _REQUEST_ID:
            if _VISIBLE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return f"{_ID_PREFIX}{next(_ids):x}"


# A random per-process prefix and a counter: unique ids at the cost of an increment.
_ID_PREFIX = os.urandom(6).hex() + "-"
_ids = itertools.count(1)


Observer = Callable[[Scope, RequestContext, int, float], None]
"""Called once per finished request with its scope, info, status and duration in seconds."""


class AccessLog:
    """Pure ASGI middleware: binds the request id, echoes it, reads or starts the request's W3C
    trace context, logs one line per request (with its `trace_id`) and tells `observe` (the
    request metrics) about it."""

    def __init__(self, app: ASGIApp, observe: Observer | None = None) -> None:
        self.app = app
        self.observe = observe
        self.log = structlog.get_logger("gateway.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The loop's clock (uvloop's ticks once per iteration) carves deadlines; the line's
        # duration is measured on the finer one.
        start = time.perf_counter()
        arrived = asyncio.get_running_loop().time()
        info = RequestContext(_request_id(scope), arrived, dict(scope["headers"]))
        begin_trace(info)
        token = current.set(info)
        status = 500
        header = (b"x-request-id", info.request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            if info.disconnected:
                status = 499
            if self.observe is not None:
                self.observe(scope, info, status, seconds)
            self.log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                endpoint=info.endpoint or None,
                status=status,
                ms=round(seconds * 1000, 2),
                cache=info.cache or None,
                complete=info.complete,
                calls=info.calls or None,
                fanout=info.fanout,
                trace_id=info.trace_id,
            )
            current.reset(token)
