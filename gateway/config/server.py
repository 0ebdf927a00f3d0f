"""What one client connection may cost `gateway serve`: the `server:` block of gateway.yaml."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gateway.config.sources import Model
from gateway.edge.limits import DEFAULT_LIMITS as _LIMITS
from gateway.edge.limits import ConnectionLimits


class ServerConfig(Model):
    """How `gateway serve` treats client connections, per process: read when it starts."""

    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = _LIMITS.max_connections
    """Open client connections at most; one more is answered 503 and closed."""
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = _LIMITS.max_header_bytes
    """A longer request head is answered 431 and closed."""
    header_timeout_s: Annotated[float, Field(gt=0, le=300)] = _LIMITS.header_timeout_s
    """A request head not complete this long after its first byte is answered 408."""
    body_timeout_s: Annotated[float, Field(gt=0, le=300)] = _LIMITS.body_timeout_s
    """A request body not complete this long after its head is answered 408."""
    keepalive_s: Annotated[float, Field(gt=0, le=300)] = _LIMITS.keepalive_s
    """An idle keep-alive connection is closed after this many seconds."""
    drain_s: Annotated[float, Field(ge=0, le=600)] = _LIMITS.drain_s
    """On SIGTERM, requests in flight get this long to finish, in seconds."""

    def limits(self) -> ConnectionLimits:
        """Return these settings as the edge server takes them."""
        return ConnectionLimits(**self.model_dump())
