"""The one request context: made by the edge, passed to the runner, read by the access log."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any


def _in_request() -> bool:
    return True


class RequestContext:
    """One request: who asked and when, what it may spend, and what it did (the access line).

    `arrived` and `deadline` are event-loop times (`loop.time()`); `headers` are the client's,
    names in lower case, as the server gives them. The runner fills `endpoint`, `cache`,
    `complete`, `calls` and `fanout`; the edge, `disconnected`.
    """

    __slots__ = (
        "arrived",
        "cache",
        "calls",
        "complete",
        "deadline",
        "disconnected",
        "endpoint",
        "fanout",
        "headers",
        "request_id",
        "watch",
    )

    def __init__(self, request_id: str, arrived: float, headers: Mapping[bytes, bytes]) -> None:
        self.request_id = request_id
        self.arrived = arrived
        self.headers = headers
        self.deadline = float("inf")
        self.watch: Callable[[], bool] = _in_request
        """Called as a fan-out starts: returns whether it runs in the request's own task (a
        background refresh does not), and the edge starts watching for the client leaving."""
        self.endpoint = ""
        self.cache = ""
        self.complete: bool | None = None
        self.disconnected = False
        self.calls: dict[str, Any] = {}
        self.fanout: tuple[float, float] | None = None
        """(ms from arrival to the fan-out's start, the fan-out's ms) when one ran for it."""


current: ContextVar[RequestContext | None] = ContextVar("gateway_request", default=None)
"""The request being served, bound once by the access log and inherited by every task it
starts, so that any log line of its fan-out carries its request id."""
