"""SQLite sources: a few aiosqlite connections on one file (`sqlite:///path/to/file.db`).

Parameters are `%(name)s` placeholders, rewritten once to SQLite's `:name` (and `%%` to `%`) and
bound by the driver. A cancelled call interrupts its statement in aiosqlite's thread, and its
connection takes the next statement only once that one has really ended. At most `max_rows + 1`
rows are read (`fetchmany`); the rest of a larger result is never computed. BLOB values come out
as base64, TEXT as text; SQLite has no JSON type, and a row does not carry its column's declared
type, so JSON stored in SQLite stays text.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiosqlite

from gateway.core import templates
from gateway.core.errors import SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.types import JSON, Call, Upstream
from upstreams.sql import SqlSettings, json_result, too_many

_PING_S = 1.0


async def sqlite_source(name: str, cfg: SqlSettings) -> Upstream:
    """Return the started SQLite source `name`: a few aiosqlite connections on one file."""
    return await _sqlite_upstream(name, cfg.dsn, min(cfg.pool.max, _SQLITE_MAX_CONNECTIONS))


@contextmanager
def map_errors(name: str) -> Iterator[None]:
    """Translate sqlite3 errors into the gateway's `SourceError` tree.

    A value the driver cannot bind or encode (an int beyond SQLite's 64 bits, a lone surrogate
    in text) is that call's `Unsendable`; other exceptions (AttributeError...) are bugs and pass.
    """
    try:
        yield
    except sqlite3.Error as exc:
        raise SourceUnavailable(f"{name}: {exc}") from exc
    except (ValueError, TypeError, OverflowError) as exc:
        # What the driver raises while binding a value (UnicodeEncodeError is a ValueError),
        # and aiosqlite on a closed connection.
        raise Unsendable(f"{name}: {type(exc).__name__}: {exc}") from exc


_SQLITE_MAX_CONNECTIONS = 4
"""SQLite reads run in parallel across connections, one aiosqlite thread each; on a small
machine more threads than this buy nothing (pool.max above it is capped)."""


async def _sqlite_upstream(name: str, dsn: str, size: int) -> Upstream:
    # `size` connections, each behind its own lock: a connection runs one statement at a time,
    # and aiosqlite gives each its own thread. sqlite:///rel.db is relative, sqlite:////abs.db
    # absolute (SQLAlchemy's convention).
    path = dsn.removeprefix("sqlite:///")
    slots: list[tuple[aiosqlite.Connection, asyncio.Lock]] = []
    try:
        with map_errors(name):
            # Opened once in a plain thread first: when aiosqlite's own open fails, its worker
            # thread outlives the failure and may report to an event loop that is already closed.
            await asyncio.to_thread(_sqlite_probe, path)
            for _ in range(max(1, size)):
                conn = await aiosqlite.connect(path)
                conn.row_factory = sqlite3.Row
                slots.append((conn, asyncio.Lock()))
    except BaseException:
        for conn, _ in slots:
            await conn.close()
        raise
    turn = itertools.count()

    def slot() -> tuple[aiosqlite.Connection, asyncio.Lock]:
        """Return an idle connection, or (all busy) the next one in turn to queue on."""
        for candidate in slots:
            if not candidate[1].locked():
                return candidate
        return slots[next(turn) % len(slots)]

    async def call(call: Call) -> JSON:
        conn, lock = slot()
        with map_errors(name):
            rows = await _sqlite_rows(
                conn, lock, _sqlite_sql(call.target), dict(call.params), call.max_rows + 1
            )
        if len(rows) > call.max_rows:
            raise too_many(name, call.max_rows)
        return json_result(name, rows, call.one, call.max_rows)

    async def ping() -> None:
        conn, lock = slot()
        try:
            async with asyncio.timeout(_PING_S):
                with map_errors(name):
                    await _sqlite_rows(conn, lock, "SELECT 1", {}, 1)
        except TimeoutError as exc:
            raise SourceTimeout(f"{name}: no answer to SELECT 1 within {_PING_S:g} s") from exc

    async def close() -> None:
        for conn, lock in slots:
            async with lock:
                await conn.close()

    def pool_stats() -> Mapping[str, int]:
        busy = sum(lock.locked() for _, lock in slots)
        return {"size": len(slots), "in_use": busy, "free": len(slots) - busy, "max": len(slots)}

    return Upstream(call=call, close=close, ping=ping, pool_stats=pool_stats)


def _sqlite_probe(path: str) -> None:
    sqlite3.connect(path).close()


@functools.lru_cache(maxsize=1024)
def _sqlite_sql(sql: str) -> str:
    """Return `sql` with pyformat placeholders in SQLite's syntax (`:name`, and `%%` as `%`)."""
    return templates.sqlite_placeholders(sql).replace("%%", "%")


async def _sqlite_rows(
    conn: aiosqlite.Connection, lock: asyncio.Lock, sql: str, params: dict[str, Any], most: int
) -> list[dict[str, Any]]:
    """Return the first `most` rows of `sql`'s result."""
    await lock.acquire()
    try:
        work = asyncio.ensure_future(_fetch(conn, sql, params, most))
    except BaseException:
        lock.release()
        raise
    # The lock is freed when the statement has really ended, not when our caller gave up, so an
    # interrupt meant for a cancelled statement can never hit the next one.
    work.add_done_callback(functools.partial(_unlock, lock))
    try:
        rows = await asyncio.shield(work)
    except asyncio.CancelledError:
        await conn.interrupt()  # stops the statement in aiosqlite's thread; does not suspend
        raise
    return [dict(zip(row.keys(), row, strict=True)) for row in rows]


async def _fetch(
    conn: aiosqlite.Connection, sql: str, params: dict[str, Any], most: int
) -> list[sqlite3.Row]:
    async with conn.execute(sql, params) as cursor:
        return list(await cursor.fetchmany(most))


def _unlock(lock: asyncio.Lock, work: asyncio.Future[Any]) -> None:
    lock.release()
    if not work.cancelled():
        work.exception()  # an abandoned statement's error (interrupted) is expected: consume it
