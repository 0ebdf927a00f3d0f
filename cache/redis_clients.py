"""The Redis clients the store talks through: the pooled one for operations, and a plain
connection for the purge subscription."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

try:
    from redis.driver_info import DriverInfo
except ImportError:  # redis-py < 7 reads its version once at import; nothing to hoist there.
    DriverInfo = None  # type: ignore[assignment,misc]


MAX_CONNECTIONS = 32
"""Connections per process (per node for a cluster); past it, callers wait up to the op timeout."""

HEALTH_CHECK_S = 5.0
"""A quiet purge subscription is pinged this often, so a dead connection is noticed."""


def client_of(url: str, op_timeout_s: float) -> Redis | RedisCluster:
    """Return the client for `redis://`, `rediss://` or `redis+cluster://host:port` (no I/O yet);
    past `MAX_CONNECTIONS` its callers wait, within `op_timeout_s`."""
    parts = urlsplit(url)
    client: Redis | RedisCluster
    if parts.scheme == "redis+cluster":
        client = RedisCluster(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            max_connections=MAX_CONNECTIONS,
            socket_connect_timeout=1.0,
            socket_timeout=1.0,
        )
    else:
        # The default pool raises past max_connections; a blocking one makes callers queue, and
        # its wait is capped by the op timeout like everything else.
        extra = {}
        if DriverInfo is not None:
            # Resolved once here: left to each new connection, it costs an importlib.metadata
            # lookup (~2 ms of CPU), which a burst of connects pays inside a 20 ms op timeout.
            extra["driver_info"] = DriverInfo()
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=op_timeout_s,
            socket_connect_timeout=1.0,
            socket_timeout=1.0,
            **extra,
        )
        client = Redis.from_pool(pool)
    return client


def subscriber_of(url: str) -> Callable[[], Redis]:
    """Return a maker of one plain connection for the purge subscription of `url`'s server."""
    parts = urlsplit(url)
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": 1.0,
        "health_check_interval": HEALTH_CHECK_S,
        # redis-py would reconnect and resubscribe by itself, hiding the purges sent meanwhile;
        # a loss must reach the near tier, which then forgets what it holds.
        "retry": Retry(NoBackoff(), 0),
    }
    if parts.scheme == "redis+cluster":
        return lambda: Redis(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            **kwargs,
        )
    return lambda: Redis.from_url(url, **kwargs)
