"""SQL sources: MySQL/MariaDB through an aiomysql pool, SQLite through one aiosqlite connection.

A call runs `Call.target` with `Call.params` bound by the driver (`%(name)s` placeholders; `%%`
is a literal percent on both backends) and returns the first row as a dict (`one`) or a list of
row dicts. Values come out JSON-ready: DECIMAL as float (precision beyond a double is lost),
DATETIME/DATE/TIME as ISO 8601 text, MySQL TIME (a duration) as `[-]HH:MM:SS[.ffffff]`, bytes as
UTF-8 text or, when they are not UTF-8, as base64 text.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import itertools
import math
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiomysql
import aiosqlite
import pymysql

from gateway.core import templates
from gateway.core.errors import NotFound, SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.types import JSON, Call, Upstream

_FLOOR_S = 0.001
_PING_S = 1.0
# Only bounds opening a connection at start-up; on the request path the caller's timeout does.
_CONNECT_TIMEOUT_S = 5.0

# ER_STATEMENT_TIMEOUT (MariaDB max_statement_time) and ER_QUERY_TIMEOUT (MySQL's equivalent).
_TIMEOUT_CODES = frozenset({1969, 3024})
# The pool could not open a connection: refused, unknown host, too many, denied, no such database.
_CONNECT_CODES = frozenset({2002, 2003, 2005, 1040, 1044, 1045, 1049, 1129, 1130})
_PLAIN = (int, str, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class SqlPoolSettings:
    """Connection pool limits of a SQL source."""

    min: int = 1
    max: int = 10
    recycle_s: int = 3600


@dataclass(frozen=True, slots=True)
class SqlSettings:
    """What a SQL source's adapter needs: its DSN and its pool limits."""

    dsn: str
    pool: SqlPoolSettings = SqlPoolSettings()


async def sqlite_source(name: str, cfg: SqlSettings) -> Upstream:
    """Return the started SQLite source `name`: a few aiosqlite connections on one file."""
    return await _sqlite_upstream(name, cfg.dsn, min(cfg.pool.max, _SQLITE_MAX_CONNECTIONS))


@contextmanager
def map_errors(name: str) -> Iterator[None]:
    """Translate aiomysql/pymysql and sqlite3 errors into the gateway's `SourceError` tree.

    A value the driver cannot bind or encode (an int beyond SQLite's 64 bits, a lone surrogate
    in text) is that call's `Unsendable`; other exceptions (AttributeError...) are bugs and pass.
    """
    try:
        yield
    except pymysql.err.MySQLError as exc:
        code = _code(exc)
        if code in _TIMEOUT_CODES:
            raise SourceTimeout(f"{name}: the database stopped the query at its budget") from exc
        raise SourceUnavailable(f"{name}: {exc}", connect=code in _CONNECT_CODES) from exc
    except sqlite3.Error as exc:
        raise SourceUnavailable(f"{name}: {exc}") from exc
    except (ValueError, TypeError, OverflowError) as exc:
        # What both drivers raise while binding a value (UnicodeEncodeError is a ValueError),
        # and aiosqlite on a closed connection.
        raise Unsendable(f"{name}: {type(exc).__name__}: {exc}") from exc


# --- MySQL / MariaDB -------------------------------------------------------------------------


async def mysql_source(name: str, cfg: SqlSettings) -> Upstream:
    """Return the started MySQL/MariaDB source `name`: an aiomysql pool."""
    options = _mysql_options(cfg)
    try:
        pool = await aiomysql.create_pool(**options)
    except pymysql.err.MySQLError:
        # The database may come up after us: start with an empty pool that fills on first use,
        # so requests get partial answers and /readyz says why instead of the gateway not starting.
        pool = aiomysql.Pool(echo=False, loop=asyncio.get_running_loop(), **options)
    wakeups: set[asyncio.Task[None]] = set()

    async def call(call: Call) -> JSON:
        loop = asyncio.get_running_loop()
        ends = min(loop.time() + call.timeout, call.deadline)
        with map_errors(name):
            async with _borrow(pool, wakeups) as conn:
                # Measured after acquiring: waiting for a connection spends the same budget.
                budget = max(ends - loop.time(), _FLOOR_S)
                sql = budgeted(call.target, budget, conn.get_server_info())
                rows = await _mysql_rows(conn, sql, dict(call.params))
        return json_result(name, rows, call.one)

    async def ping() -> None:
        try:
            async with asyncio.timeout(_PING_S):
                with map_errors(name):
                    async with _borrow(pool, wakeups) as conn:
                        await _mysql_rows(conn, "SELECT 1", None)
        except TimeoutError as exc:
            raise SourceTimeout(f"{name}: no answer to SELECT 1 within {_PING_S:g} s") from exc

    async def close() -> None:
        pool.close()
        await pool.wait_closed()

    def pool_stats() -> Mapping[str, int]:
        size, free = pool.size, pool.freesize
        return {"size": size, "in_use": size - free, "free": free, "max": pool.maxsize}

    return Upstream(call=call, close=close, ping=ping, pool_stats=pool_stats)


def budgeted(sql: str, budget_s: float, server_version: str) -> str:
    """Return `sql` made to stop within `budget_s` on the server itself, per its version string.

    MariaDB (10.1.2 and later): `SET STATEMENT max_statement_time=... FOR`. MySQL (5.7.8 and
    later, which has no `SET STATEMENT`): the `MAX_EXECUTION_TIME` optimizer hint, which MySQL
    applies to a top-level SELECT only. Anything else goes as it is: the call's own timeout
    still ends it on our side (and closes its connection).
    """
    flavour = _flavour(server_version)
    if flavour == "mariadb":
        return f"SET STATEMENT max_statement_time={budget_s:.3f} FOR {sql}"
    if flavour == "mysql":
        select = _SELECT.match(sql)
        if select is not None:
            ms = max(1, math.ceil(budget_s * 1000))
            return f"{sql[: select.end()]} /*+ MAX_EXECUTION_TIME({ms}) */{sql[select.end() :]}"
    return sql


_SELECT = re.compile(r"\s*SELECT\b", re.IGNORECASE)
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


@functools.lru_cache(maxsize=64)
def _flavour(server_version: str) -> Literal["mariadb", "mysql", ""]:
    """Return which statement timeout a server has: MariaDB's, MySQL's hint, or none."""
    mariadb = "mariadb" in server_version.lower()
    # MariaDB before 11 says `5.5.5-10.11.6-MariaDB...`: the prefix is for old MySQL clients.
    found = _VERSION.match(server_version.removeprefix("5.5.5-") if mariadb else server_version)
    version = tuple(int(n) for n in found.groups()) if found else (0, 0, 0)
    if mariadb:
        return "mariadb" if version >= (10, 1, 2) else ""
    return "mysql" if version >= (5, 7, 8) else ""


def _mysql_options(cfg: SqlSettings) -> dict[str, Any]:
    dsn = urlsplit(cfg.dsn)
    return {
        "host": dsn.hostname,
        "port": dsn.port or 3306,
        "user": unquote(dsn.username or ""),
        "password": unquote(dsn.password or ""),
        "db": unquote(dsn.path.lstrip("/")) or None,
        "minsize": cfg.pool.min,
        "maxsize": cfg.pool.max,
        "pool_recycle": cfg.pool.recycle_s,
        "autocommit": True,
        "charset": "utf8mb4",
        "connect_timeout": _CONNECT_TIMEOUT_S,
    }


@asynccontextmanager
async def _borrow(pool: Any, wakeups: set[asyncio.Task[None]]) -> AsyncIterator[Any]:
    """Lend a pooled connection, closing it first unless its protocol state is known to be clean."""
    conn = await pool.acquire()
    clean = False
    try:
        yield conn
        clean = True
    except pymysql.err.MySQLError as exc:
        # The server answered with an error packet (codes below 2000): the reply was read whole.
        clean = 0 < _code(exc) < 2000
        raise
    finally:
        if not clean:
            # Interrupted mid-reply (cancelled by the caller's timeout, or lost): the rest of that
            # reply would be read by the next query on this connection. aiomysql closes it too
            # since aio-libs/aiomysql#79; we do not rely on that.
            conn.close()
        pool.release(conn)
        if conn.closed:
            # aiomysql wakes a waiter only when a live connection comes back; without this, a call
            # waiting for the slot a closed connection freed would wait out its own timeout.
            task = asyncio.get_running_loop().create_task(pool._wakeup())
            wakeups.add(task)
            task.add_done_callback(wakeups.discard)


async def _mysql_rows(conn: Any, sql: str, params: dict[str, Any] | None) -> list[dict[str, Any]]:
    cur = await conn.cursor(aiomysql.DictCursor)
    await cur.execute(sql, params)
    rows = await cur.fetchall()
    await cur.close()
    return list(rows)


def _code(exc: pymysql.err.MySQLError) -> int:
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0


# --- SQLite ----------------------------------------------------------------------------------


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
            rows = await _sqlite_rows(conn, lock, _sqlite_sql(call.target), dict(call.params))
        return json_result(name, rows, call.one)

    async def ping() -> None:
        conn, lock = slot()
        try:
            async with asyncio.timeout(_PING_S):
                with map_errors(name):
                    await _sqlite_rows(conn, lock, "SELECT 1", {})
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
    conn: aiosqlite.Connection, lock: asyncio.Lock, sql: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    await lock.acquire()
    try:
        work = asyncio.ensure_future(conn.execute_fetchall(sql, params))
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


def _unlock(lock: asyncio.Lock, work: asyncio.Future[Any]) -> None:
    lock.release()
    if not work.cancelled():
        work.exception()  # an abandoned statement's error (interrupted) is expected: consume it


# --- rows to JSON ----------------------------------------------------------------------------


def json_result(name: str, rows: list[dict[str, Any]], one: bool) -> JSON:
    """Return the rows as JSON: the first row (`one`, `NotFound` without one) or all of them."""
    if one:
        if not rows:
            raise NotFound(f"{name}: no row")
        return _json_row(rows[0])
    return [_json_row(row) for row in rows]


def _json_row(row: dict[str, Any]) -> dict[str, JSON]:
    return {
        key: value if type(value) in _PLAIN else json_value(value) for key, value in row.items()
    }


def json_value(value: Any) -> JSON:
    """Return a driver's value as JSON: DECIMAL as float, temporal values as ISO 8601 text, bytes
    as UTF-8 (or base64) text, sets sorted; anything else as it is."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return _duration(value)
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


def _duration(value: datetime.timedelta) -> str:
    micros = abs(value) // datetime.timedelta(microseconds=1)
    seconds, micros = divmod(micros, 1_000_000)
    text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if micros:
        text += f".{micros:06d}"
    return "-" + text if value < datetime.timedelta(0) else text
