"""What makes a running gateway reload or drain: the config file changing, SIGHUP, SIGTERM."""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Protocol

import structlog

from gateway.config.loader import LoadedConfig
from gateway.config.schema import ServerConfig

_log = structlog.get_logger("gateway.app")


class Running(Protocol):
    """The running gateway, as seen from here (`gateway.app.Gateway`)."""

    loaded: LoadedConfig
    server: ServerConfig
    draining: bool

    async def reload_logged(self, *, only_if_changed: bool = False) -> None: ...


async def watch(gw: Running, every_s: float = 1.0) -> None:
    """Reload whenever the config file's modification time changes, until cancelled."""
    seen = _mtime(gw.loaded.file)
    while True:
        await asyncio.sleep(every_s)
        now = _mtime(gw.loaded.file)
        if now != seen:
            seen = now
            # Every worker watches the file: the first to see a change reloads them all.
            await gw.reload_logged(only_if_changed=True)


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None  # being replaced (editors rename over it): the next tick sees the new one


def on_sighup(gw: Running) -> Callable[[], None]:
    """Reload on SIGHUP while serving; return the function that stops listening for it."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def hup() -> None:
        _log.info("sighup", file=gw.loaded.file)
        task = loop.create_task(gw.reload_logged())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, hup)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        # Not the main thread, or no SIGHUP on this platform: reload stays on /admin/reload.
        return lambda: None

    def stop() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return stop


def on_sigterm(gw: Running) -> Callable[[], None]:
    """Mark `gw` draining the moment SIGTERM arrives, then hand the signal to the handler that
    was there before (uvicorn's, which starts its graceful shutdown); return the function that
    puts that handler back."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return lambda: None  # no server's handler to hand it to: the signal's default stays
    loop = asyncio.get_running_loop()

    def term(sig: int, frame: FrameType | None) -> None:
        if not gw.draining:
            gw.draining = True
            # Not logged here: a signal handler may interrupt the logger holding its own lock.
            drain_s = gw.server.drain_s
            # Nor in the interrupted code's context (often a request's, whose id it would carry).
            loop.call_soon_threadsafe(
                lambda: _log.info("draining", drain_s=drain_s), context=contextvars.Context()
            )
        previous(sig, frame)

    try:
        signal.signal(signal.SIGTERM, term)
    except ValueError:
        return lambda: None  # not the main thread: the server's handler stays alone

    def stop() -> None:
        if signal.getsignal(signal.SIGTERM) is term:
            signal.signal(signal.SIGTERM, previous)

    return stop
