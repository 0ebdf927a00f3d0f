"""PostgreSQL sources through an asyncpg pool (`postgresql://user@host:port/db`).

A call's SQL arrives with `$1..$n` placeholders (translated once from `%(name)s` when the config
loads, by `positional`) and its parameters in that order, bound by the driver. Before a query
the session's `statement_timeout` is set to what is left of the call's budget (rounded up to 10
ms, and only when the session's differs), so the server stops a query our side gave up on; a call
cancelled mid-flight has asyncpg send the server a cancel request, and its connection goes back
to the pool only once that cancel is done. At most `max_rows + 1` rows are read: the
server stops there (asyncpg's fetch with a row limit, the one private asyncpg name used). Values
come out as the MySQL adapter gives them (`upstreams.sql.json_value`: bytea as base64), plus
UUID and network addresses as text, arrays as lists, and json/jsonb as JSON values (decoded by
a codec each connection gets; a text parameter bound to a json column is sent as it is). A
query whose trace this gateway exports carries its `traceparent` as a comment
(`/* traceparent='00-...' */`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from gateway.core.context import sql_comment
from gateway.core.errors import SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.types import JSON, Call, Upstream
from upstreams.sql import SqlSettings, json_result, json_text, json_value, too_many

_PING_S = 1.0
_STEP_MS = 10
"""The server's limit is the budget rounded up to this step, so that a connection whose limit is
already set to it (most calls of a source have the same budget) skips one round trip; the
caller's own timeout still ends the wait on time, and cancels the query on the server."""
# Only bounds opening a connection; on the request path the caller's timeout does.
_CONNECT_TIMEOUT_S = 5.0
_CANCELED = "57014"  # query_canceled: our statement_timeout (or a cancel request)
# SQLSTATE classes that mean no connection: 08 connection, 28 authorization, 3D no such
# database, 53300 too many connections, 57P03 the server is starting or stopping.
_CONNECT_STATES = ("08", "28", "3D", "53300", "57P03")
_PLAIN = (int, str, float, bool, type(None))
_PLACEHOLDER = re.compile(r"%%|%\(([A-Za-z_][A-Za-z0-9_]*)\)s")


def positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """Return `sql` with each `%(name)s` as `$n` (one number per name, in order of first use)
    and `%%` as `%`, and the names in the order their numbers bind them."""
    names: dict[str, int] = {}

    def number(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return "%"
        return f"${names.setdefault(m.group(1), len(names) + 1)}"

    return _PLACEHOLDER.sub(number, sql), tuple(names)


def check_dsn(dsn: str) -> str | None:
    """Return what is wrong with a postgresql:// DSN, or None."""
    return None if urlsplit(dsn).hostname else "a postgresql:// DSN needs a host"


async def postgresql_source(name: str, cfg: SqlSettings) -> Upstream:
    """Return the started PostgreSQL source `name`: an asyncpg pool."""
    options: dict[str, Any] = {
        "dsn": cfg.dsn,
        "max_size": cfg.pool.max,
        "max_inactive_connection_lifetime": cfg.pool.recycle_s,
        "timeout": _CONNECT_TIMEOUT_S,
        "command_timeout": None,
        # The default reset (RESET ALL, UNLISTEN...) is one more round trip per call; a call
        # changes nothing but statement_timeout, which the next call sets again.
        "reset": _keep,
    }
    # statement_timeout each pooled session has (by backend pid); a new session forgets its pid's.
    limits: dict[int, int] = {}

    async def _start(conn: asyncpg.Connection) -> None:
        limits.pop(conn.get_server_pid(), None)
        for json_type in ("json", "jsonb"):
            # Built-in types: asyncpg sets the codec without asking the server. A decoder's
            # error reaches the caller as it is: BadPayload, not a driver error.
            decode = functools.partial(json_text, name, json_type)
            await conn.set_type_codec(
                json_type, schema="pg_catalog", encoder=_json_param, decoder=decode
            )

    options["init"] = _start
    try:
        pool = await asyncpg.create_pool(min_size=cfg.pool.min, **options)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        # The database may come up after us: start with an empty pool that fills on first use,
        # so requests get partial answers and /readyz says why instead of the gateway not starting.
        pool = await asyncpg.create_pool(min_size=0, **options)

    async def call(call: Call) -> JSON:
        loop = asyncio.get_running_loop()
        ends = min(loop.time() + call.timeout, call.deadline)
        with map_errors(name, connect=True):
            conn = await pool.acquire()
        try:
            # Measured after acquiring: waiting for a connection spends the same budget.
            ms = _STEP_MS * max(1, math.ceil((ends - loop.time()) * 1000 / _STEP_MS))
            pid = conn.get_server_pid()
            with map_errors(name):
                if limits.get(pid) != ms:
                    limits.pop(pid, None)  # unknown until the server has said yes
                    await conn.execute(f"SET statement_timeout = {ms}")
                    limits[pid] = ms
                # `fetch` with a row limit; the server stops after it (its portal is suspended).
                rows = await conn._execute(
                    _traced(call), list(call.params.values()), call.max_rows + 1, None
                )
        finally:
            # Shielded by asyncpg; after a cancel it waits for the server to confirm it.
            await pool.release(conn)
        if len(rows) > call.max_rows:
            raise too_many(name, call.max_rows)
        return json_result(name, [_json_row(r) for r in rows], call.one, call.max_rows)

    async def ping() -> None:
        try:
            async with asyncio.timeout(_PING_S):
                with map_errors(name, connect=True):
                    async with pool.acquire() as conn:
                        pid, ms = conn.get_server_pid(), int(_PING_S * 1000)
                        limits.pop(pid, None)
                        await conn.execute(f"SET statement_timeout = {ms}")
                        limits[pid] = ms
                        await conn.fetchval("SELECT 1")
        except TimeoutError as exc:
            raise SourceTimeout(f"{name}: no answer to SELECT 1 within {_PING_S:g} s") from exc

    async def close() -> None:
        await pool.close()

    def pool_stats() -> Mapping[str, int]:
        size, free = pool.get_size(), pool.get_idle_size()
        return {"size": size, "in_use": size - free, "free": free, "max": pool.get_max_size()}

    return Upstream(call=call, close=close, ping=ping, pool_stats=pool_stats)


def _traced(call: Call) -> str:
    """Return the call's SQL, prefixed with its `traceparent` as a comment when this gateway
    exports the trace: asyncpg caches prepared statements by their text, so a comment on every
    call would cost each one a prepare round trip (and evict the statements worth keeping); a
    client's `sampled` flag alone must not make every query new text."""
    if call.exported and call.trace:
        return sql_comment(call.trace) + call.target
    return call.target


def _json_param(value: Any) -> str:
    """Return a value bound to a json/jsonb parameter as JSON text (text is taken as JSON)."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


async def _keep(conn: asyncpg.Connection) -> None:
    """Reset nothing (asyncpg itself rolls back a transaction left open)."""


@contextmanager
def map_errors(name: str, *, connect: bool = False) -> Iterator[None]:
    """Translate asyncpg and socket errors into the gateway's `SourceError` tree.

    `connect` marks errors while borrowing a connection: the query was never sent. A value the
    driver cannot encode (an int past the column's range, a lone surrogate) is `Unsendable`;
    other exceptions (AttributeError...) are bugs and pass.
    """
    try:
        yield
    except asyncpg.PostgresError as exc:
        if isinstance(exc.__cause__, ValueError | TypeError | OverflowError):
            # asyncpg's DataError for an argument it could not encode: never sent, never will be.
            raise Unsendable(f"{name}: {type(exc).__name__}: {exc}") from exc
        state = str(getattr(exc, "sqlstate", "") or "")
        if state == _CANCELED:
            raise SourceTimeout(f"{name}: the database stopped the query at its budget") from exc
        down = connect or state.startswith(_CONNECT_STATES)
        raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}", connect=down) from exc
    except (ValueError, TypeError, OverflowError) as exc:
        raise Unsendable(f"{name}: {type(exc).__name__}: {exc}") from exc
    except asyncpg.InterfaceError as exc:
        raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}", connect=connect) from exc
    except OSError as exc:  # refused, unreachable, reset; TimeoutError is the caller's
        if isinstance(exc, TimeoutError):
            raise
        raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}", connect=connect) from exc


def _json_row(record: asyncpg.Record) -> dict[str, JSON]:
    return {k: v if type(v) in _PLAIN else _json(v) for k, v in record.items()}


def _json(value: Any) -> JSON:
    if isinstance(value, uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, list | tuple):
        return [v if type(v) in _PLAIN else _json(v) for v in value]
    return json_value(value)
