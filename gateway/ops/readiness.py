"""`/readyz`: whether this instance can serve, and the last known state of what it depends on.

Readiness fails only for the instance's own reasons (starting, draining, no runtime): every
instance shares the same upstreams, so failing on one of theirs would pull them all at once.
Each source and the cache is pinged at most once per `PING_EVERY_S`, whatever the probe rate;
probes that arrive while a ping is in flight share it. States are reported by name with a
generic reason, never an address or a driver's message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog
from pydantic import BaseModel

from cache.store import CacheUnavailable
from gateway.core.errors import CircuitOpen, SourceError, SourceTimeout, SourceUnavailable

if TYPE_CHECKING:
    from cache.composite import CompositeCache
    from gateway.core.types import Upstream

PING_EVERY_S = 1.0
"""The shortest time between two pings of one source."""

ANSWER_WITHIN_S = 0.5
"""How long a probe waits for pings it started before it answers with what is known."""

PING_LIMIT_S = 5.0
"""The longest one ping may run (adapters bound theirs too; this is the backstop)."""

_log = structlog.get_logger("gateway.readiness")


class Health(BaseModel):
    """`/healthz`: the process is alive."""

    status: Literal["ok"]


class Known(BaseModel):
    """The last known state of one source or the cache, as `/readyz` reports it."""

    state: Literal["up", "down", "unknown"]
    reason: Literal["timeout", "circuit_open", "unavailable", "error"] | None = None
    age_s: float | None = None
    """Seconds since it was last pinged; absent before the first ping ends."""


class Ready(BaseModel):
    """`/readyz` while this instance can serve: each source's and the cache's state."""

    status: Literal["ready"]
    sources: dict[str, Known]
    cache: Known


class NotReady(BaseModel):
    """`/readyz` while this instance is starting or draining."""

    status: Literal["starting", "draining"]


class Pinged(Protocol):
    """What readiness pings of a runtime (`gateway.runtime.Runtime`): its sources and cache."""

    @property
    def upstreams(self) -> Mapping[str, Upstream]: ...

    @property
    def cache(self) -> CompositeCache: ...


class Serving(Protocol):
    """The running gateway, as readiness sees it (`gateway.app.Gateway`)."""

    draining: bool

    def current(self) -> Pinged: ...


@dataclass(slots=True)
class _Known:
    """The last known state of one pinged thing, and its ping in flight."""

    target: object
    state: str = "unknown"
    reason: str | None = None
    started: float = float("-inf")
    checked: float | None = None
    task: asyncio.Task[None] | None = None

    def report(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.checked is not None:
            out["age_s"] = round(max(0.0, now - self.checked), 1)
        return out


def reason_of(exc: BaseException) -> str:
    """Return the generic reason for a failed ping: timeout, circuit_open, unavailable, error."""
    if isinstance(exc, SourceTimeout | TimeoutError):
        return "timeout"
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if isinstance(exc, SourceUnavailable | CacheUnavailable):
        return "unavailable"
    return "error"


class Readiness:
    """The `/readyz` answer for one gateway, with its pings cached and shared."""

    def __init__(
        self,
        every_s: float = PING_EVERY_S,
        wait_s: float = ANSWER_WITHIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s = every_s
        self.wait_s = wait_s
        self.clock = clock
        self._known: dict[tuple[str, str], _Known] = {}

    async def answer(self, gw: Serving) -> tuple[int, dict[str, Any]]:
        """Return the status code and body of `/readyz` for `gw` now."""
        if gw.draining:
            return 503, {"status": "draining"}
        try:
            rt = gw.current()
        except RuntimeError:  # the lifespan has not started the runtime yet
            return 503, {"status": "starting"}
        targets: dict[tuple[str, str], tuple[object, Callable[[], Awaitable[None]]]] = {
            ("source", name): (u, u.ping) for name, u in rt.upstreams.items()
        }
        targets[("cache", "cache")] = (rt.cache, rt.cache.ping)
        for key in [k for k in self._known if k not in targets]:
            self._forget(key)
        now = self.clock()
        started = []
        for key, (target, ping) in targets.items():
            known = self._known.get(key)
            if known is None or known.target is not target:  # new, or replaced by a reload
                if known is not None:
                    self._forget(key)
                known = self._known[key] = _Known(target)
            if known.task is None and now - known.started >= self.every_s:
                known.started = now
                known.task = asyncio.create_task(self._ping(known, ping))
            if known.task is not None:
                started.append(known.task)
        if started:
            # Not cancelled on timeout: the pings finish for the next probe to report.
            await asyncio.wait(started, timeout=self.wait_s)
        now = self.clock()
        return 200, {
            "status": "ready",
            "sources": {
                name: self._known[(kind, name)].report(now)
                for kind, name in targets
                if kind == "source"
            },
            "cache": self._known[("cache", "cache")].report(now),
        }

    async def close(self) -> None:
        """Cancel the pings in flight (the runtime they ping is closing)."""
        tasks = [k.task for k in self._known.values() if k.task is not None]
        for key in list(self._known):
            self._forget(key)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _ping(self, known: _Known, ping: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(PING_LIMIT_S):
                await ping()
        except (SourceError, CacheUnavailable, TimeoutError) as exc:
            known.state, known.reason = "down", reason_of(exc)
        except Exception:
            # Not a translated failure: a bug, logged with its traceback, never readiness's.
            _log.exception("ping_failed")
            known.state, known.reason = "down", "error"
        else:
            known.state, known.reason = "up", None
        finally:
            known.checked = self.clock()
            known.task = None

    def _forget(self, key: tuple[str, str]) -> None:
        known = self._known.pop(key)
        if known.task is not None:
            known.task.cancel()
