"""MySQL/MariaDB sources through an aiomysql pool (`mysql://user:password@host:port/db`).

Parameters are `%(name)s` placeholders bound by the driver (`%%` is a literal percent). Each query
carries the server's own statement timeout, set from what is left of the call's budget
(`budgeted`), and a connection interrupted mid-reply is closed, never reused.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiomysql
import pymysql

from gateway.core.errors import SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.types import JSON, Call, Upstream
from upstreams.sql import SqlSettings, json_result

_FLOOR_S = 0.001
_PING_S = 1.0
# Only bounds opening a connection at start-up; on the request path the caller's timeout does.
_CONNECT_TIMEOUT_S = 5.0

# ER_STATEMENT_TIMEOUT (MariaDB max_statement_time) and ER_QUERY_TIMEOUT (MySQL's equivalent).
_TIMEOUT_CODES = frozenset({1969, 3024})
# The pool could not open a connection: refused, unknown host, too many, denied, no such database.
_CONNECT_CODES = frozenset({2002, 2003, 2005, 1040, 1044, 1045, 1049, 1129, 1130})


@contextmanager
def map_errors(name: str) -> Iterator[None]:
    """Translate aiomysql/pymysql errors into the gateway's `SourceError` tree.

    A value the driver cannot bind or encode (a lone surrogate in text) is that call's
    `Unsendable`; other exceptions (AttributeError...) are bugs and pass.
    """
    try:
        yield
    except pymysql.err.MySQLError as exc:
        code = _code(exc)
        if code in _TIMEOUT_CODES:
            raise SourceTimeout(f"{name}: the database stopped the query at its budget") from exc
        raise SourceUnavailable(f"{name}: {exc}", connect=code in _CONNECT_CODES) from exc
    except (ValueError, TypeError, OverflowError) as exc:
        # What the driver raises while binding a value (UnicodeEncodeError is a ValueError).
        raise Unsendable(f"{name}: {type(exc).__name__}: {exc}") from exc


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
            # Private, and the only private aiomysql name used: tests/test_sql_source.py fails by
            # name when a release drops it.
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
