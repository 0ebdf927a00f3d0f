"""MySQL/MariaDB sources through an aiomysql pool (`mysql://user:password@host:port/db`).

Parameters are `%(name)s` placeholders bound by the driver (`%%` is a literal percent). Each query
carries the server's own statement timeout, set from what is left of the call's budget
(`budgeted`), and a connection interrupted mid-reply is closed, never reused.

Rows are read unbuffered, at most `max_rows + 2` of them; MariaDB is also told to send no more
than `max_rows + 1` (`sql_select_limit`, unless the query has its own LIMIT), and when more rows
follow, that unread rest goes with its connection, which is closed. A query is prefixed with
the request's trace context as a comment (`/* traceparent='00-...' */`), for the server's logs.

aiomysql gives bytes exactly for columns of the binary charset (BINARY, VARBINARY, BLOB, BIT),
whatever the bytes hold, so a `_bin` collation's text stays text; bytes become base64. JSON
columns become JSON values: MySQL's JSON type by its type code, MariaDB's (LONGTEXT with a
`json_valid` CHECK) by the table column a result column comes from, learned from
information_schema.CHECK_CONSTRAINTS once per table for the source's life. JSON built by
MariaDB's functions, or read through a view, is text.
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
from pymysql.constants import FIELD_TYPE

from gateway.core.context import sql_comment
from gateway.core.errors import SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.types import JSON, Call, Upstream
from upstreams.sql import SqlSettings, json_result, json_text, too_many

_FLOOR_S = 0.001
_PING_S = 1.0
# Only bounds opening a connection at start-up; on the request path the caller's timeout does.
_CONNECT_TIMEOUT_S = 5.0

# ER_STATEMENT_TIMEOUT (MariaDB max_statement_time) and ER_QUERY_TIMEOUT (MySQL's equivalent).
_TIMEOUT_CODES = frozenset({1969, 3024})
# The pool could not open a connection: refused, unknown host, too many, denied, no such database.
_CONNECT_CODES = frozenset({2002, 2003, 2005, 1040, 1044, 1045, 1049, 1129, 1130})
# Text of these types may be a MariaDB JSON column (LONGTEXT; the wire says BLOB for all TEXTs).
_TEXT_BLOBS = frozenset(
    {FIELD_TYPE.TINY_BLOB, FIELD_TYPE.MEDIUM_BLOB, FIELD_TYPE.LONG_BLOB, FIELD_TYPE.BLOB}
)
_BINARY_CHARSET = 63
_JSON_CHECKS = (
    "SELECT CONSTRAINT_NAME AS col FROM information_schema.CHECK_CONSTRAINTS "
    "WHERE CONSTRAINT_SCHEMA = %(db)s AND TABLE_NAME = %(table)s "
    "AND CHECK_CLAUSE = CONCAT('json_valid(`', CONSTRAINT_NAME, '`)')"
)
_KNOWN_TABLES = 1024


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
    # The JSON columns of each MariaDB table a result came from, by (database, table).
    json_columns: dict[tuple[str, str], frozenset[str]] = {}

    async def call(call: Call) -> JSON:
        loop = asyncio.get_running_loop()
        ends = min(loop.time() + call.timeout, call.deadline)
        with map_errors(name):
            async with _borrow(pool, wakeups) as conn:
                # Measured after acquiring: waiting for a connection spends the same budget.
                budget = max(ends - loop.time(), _FLOOR_S)
                sql = budgeted(call.target, budget, conn.get_server_info(), call.max_rows + 1)
                if call.trace:
                    sql = sql_comment(call.trace) + sql
                rows, fields, ended = await _mysql_rows(conn, sql, dict(call.params), call.max_rows)
                if not ended:
                    # The rest is never read: it goes with the connection `_borrow` closes.
                    raise too_many(name, call.max_rows)
                json_keys = (
                    await _json_keys(conn, fields, json_columns, ends)
                    if rows and len(rows) <= call.max_rows
                    else []
                )
        for key in json_keys:
            for row in rows:
                if row[key] is not None:
                    row[key] = json_text(name, key, row[key])
        return json_result(name, rows, call.one, call.max_rows)

    async def ping() -> None:
        try:
            async with asyncio.timeout(_PING_S):
                with map_errors(name):
                    async with _borrow(pool, wakeups) as conn:
                        await _mysql_rows(conn, "SELECT 1", None, 1)
        except TimeoutError as exc:
            raise SourceTimeout(f"{name}: no answer to SELECT 1 within {_PING_S:g} s") from exc

    async def close() -> None:
        pool.close()
        await pool.wait_closed()

    def pool_stats() -> Mapping[str, int]:
        size, free = pool.size, pool.freesize
        return {"size": size, "in_use": size - free, "free": free, "max": pool.maxsize}

    return Upstream(call=call, close=close, ping=ping, pool_stats=pool_stats)


def budgeted(sql: str, budget_s: float, server_version: str, rows: int | None = None) -> str:
    """Return `sql` made to stop within `budget_s` on the server itself, per its version string.

    MariaDB (10.1.2 and later): `SET STATEMENT max_statement_time=... FOR`, which also caps a
    top-level SELECT at `rows` rows (`sql_select_limit`; the query's own LIMIT wins). MySQL
    (5.7.8 and later, which has no `SET STATEMENT`): the `MAX_EXECUTION_TIME` optimizer hint,
    which MySQL applies to a top-level SELECT only. Anything else goes as it is: the call's own
    timeout still ends it on our side (and closes its connection).
    """
    flavour = _flavour(server_version)
    if flavour == "mariadb":
        limit = "" if rows is None else f", sql_select_limit={rows}"
        return f"SET STATEMENT max_statement_time={budget_s:.3f}{limit} FOR {sql}"
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


async def _mysql_rows(
    conn: Any, sql: str, params: dict[str, Any] | None, most: int
) -> tuple[list[dict[str, Any]], list[Any], bool]:
    """Return up to `most + 1` rows, read unbuffered, the result's pymysql field descriptors,
    and whether the result ended there; when it did not, the rest is left unread (and the
    connection cannot take another query)."""
    cur = await conn.cursor(aiomysql.SSDictCursor)
    await cur.execute(sql, params)
    # Private, like pool._wakeup: the cursor's description has no charset and no origin table.
    result = cur._result
    fields = list(result.fields) if result is not None and result.fields else []
    rows = list(await cur.fetchmany(most + 1))
    # One more than `most` may be all there is (MariaDB's sql_select_limit stops there).
    if len(rows) > most and await cur.fetchone() is not None:
        return rows, fields, False
    await cur.close()
    return rows, fields, True


async def _json_keys(
    conn: Any, fields: list[Any], known: dict[tuple[str, str], frozenset[str]], ends: float
) -> list[str]:
    """Return the keys of a result's JSON columns: MySQL's JSON type, and MariaDB text columns of
    a table whose `json_valid` CHECK makes them JSON (asked once per table, then remembered,
    within what is left of the call's budget `ends`, loop time, as the call's own query)."""
    keys: list[str] = []
    names: list[str] = []
    for field in fields:
        # The row's key, as aiomysql's DictCursor names a column whose name came before.
        key = f"{field.table_name}.{field.name}" if field.name in names else field.name
        names.append(key)
        if field.type_code == FIELD_TYPE.JSON:
            keys.append(key)
        elif (
            field.type_code in _TEXT_BLOBS
            and field.charsetnr != _BINARY_CHARSET
            and field.org_table
            and field.org_name
        ):
            db = field.db.decode() if isinstance(field.db, bytes) else field.db  # pymysql: bytes
            table = (db, field.org_table)
            columns = known.get(table)
            if columns is None:
                if len(known) >= _KNOWN_TABLES:
                    known.clear()
                cur = await conn.cursor()
                budget = max(ends - asyncio.get_running_loop().time(), _FLOOR_S)
                sql = budgeted(_JSON_CHECKS, budget, conn.get_server_info())
                await cur.execute(sql, {"db": db, "table": field.org_table})
                columns = known[table] = frozenset(col for (col,) in await cur.fetchall())
                await cur.close()
            if field.org_name in columns:
                keys.append(key)
    return keys


def _code(exc: pymysql.err.MySQLError) -> int:
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
