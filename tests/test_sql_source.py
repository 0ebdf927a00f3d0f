"""The SQL source against the real MariaDB and a temporary SQLite file."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import pytest

from gateway.config.kinds import KINDS
from gateway.core.errors import NotFound, SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.types import Call, Upstream
from tests.support import free_port, mysql_connect
from upstreams import mysql, sqlite
from upstreams.mysql import budgeted
from upstreams.sql import SqlPoolSettings, SqlSettings

TABLE = "sqlsrc_products"
ROWS = [
    (1, "SKU-1", "Lamp", "home"),
    (2, "SKU-2", "Chair", "home"),
    (3, "SKU-3", "Pen", "office"),
]
SLOW_SQLITE = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000000) "
    "SELECT count(*) AS n FROM c"
)


@pytest.fixture(scope="module")
def mysql_dsn(mysql_url: str) -> Iterator[str]:
    """The session database with this module's tables in it."""
    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, sku VARCHAR(20), "
            "name VARCHAR(50), category VARCHAR(20))"
        )
        cur.executemany(f"INSERT INTO {TABLE} VALUES (%s, %s, %s, %s)", ROWS)
        cur.execute(
            "CREATE TABLE sqlsrc_values (id INT PRIMARY KEY, price DECIMAL(10, 2), "
            "created DATETIME(3), released DATE, opens TIME, raw VARBINARY(8))"
        )
        cur.execute(
            "INSERT INTO sqlsrc_values VALUES (1, 19.99, '2024-05-06 07:08:09.123', "
            "'2024-05-06', '-01:02:03', X'FF00')"
        )
    try:
        yield mysql_url
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}, sqlsrc_values")
        conn.close()


@pytest.fixture
def sqlite_dsn(tmp_path: Path) -> str:
    """A SQLite file holding the same products table."""
    path = tmp_path / "catalog.db"
    conn = sqlite3.connect(path)
    conn.execute(
        f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, sku TEXT, name TEXT, category TEXT)"
    )
    conn.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", ROWS)
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


def _config(dsn: str, *, pool_min: int = 1, pool_max: int = 4) -> SqlSettings:
    return SqlSettings(dsn, SqlPoolSettings(min=pool_min, max=pool_max))


async def sql_source(name: str, cfg: SqlSettings) -> Upstream:
    """Start the adapter the table of source kinds gives the DSN's scheme."""
    return await KINDS[("sql", urlsplit(cfg.dsn).scheme)].open(name, cfg)


@asynccontextmanager
async def started(dsn: str, *, pool_min: int = 1, pool_max: int = 4) -> AsyncIterator[Upstream]:
    """A started SQL source, closed afterwards."""
    upstream = await sql_source("catalog", _config(dsn, pool_min=pool_min, pool_max=pool_max))
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture(params=["mysql", "sqlite"])
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Upstream]:
    """A started source over the products table, once per backend."""
    dsn = request.getfixturevalue(f"{request.param}_dsn")
    async with started(dsn) as upstream:
        yield upstream


def call(
    sql: str, params: dict[str, Any] | None = None, *, one: bool = False, timeout: float = 5.0
) -> Call:
    deadline = asyncio.get_running_loop().time() + timeout
    return Call(
        source="catalog",
        name="product",
        target=sql,
        params=params or {},
        timeout=timeout,
        deadline=deadline,
        one=one,
    )


BY_ID = f"SELECT id, sku, name, category FROM {TABLE} WHERE id = %(id)s"
BY_CATEGORY = f"SELECT id, sku FROM {TABLE} WHERE category = %(category)s ORDER BY id"


# --- shared behaviour, both backends --------------------------------------------------------


async def test_one_returns_the_first_row_as_a_dict(db: Upstream) -> None:
    row = await db.call(call(BY_ID, {"id": 2}, one=True))
    assert row == {"id": 2, "sku": "SKU-2", "name": "Chair", "category": "home"}


async def test_list_returns_every_row_as_dicts_in_query_order(db: Upstream) -> None:
    rows = await db.call(call(BY_CATEGORY, {"category": "home"}))
    assert rows == [{"id": 1, "sku": "SKU-1"}, {"id": 2, "sku": "SKU-2"}]


async def test_one_without_a_row_raises_not_found_and_a_list_is_empty(db: Upstream) -> None:
    with pytest.raises(NotFound):
        await db.call(call(BY_ID, {"id": 404}, one=True))
    assert await db.call(call(BY_CATEGORY, {"category": "garden"})) == []


@pytest.mark.parametrize("payload", ["1 OR 1=1", f"'; DROP TABLE {TABLE}; --", "1' OR '1'='1"])
async def test_parameters_are_bound_so_injection_payloads_find_nothing(
    db: Upstream, payload: str
) -> None:
    assert await db.call(call(BY_CATEGORY, {"category": payload})) == []
    with pytest.raises(NotFound):
        await db.call(call(f"SELECT id FROM {TABLE} WHERE sku = %(id)s", {"id": payload}, one=True))
    count = await db.call(call(f"SELECT COUNT(*) AS n FROM {TABLE}", one=True))
    assert count == {"n": len(ROWS)}


async def test_a_literal_percent_is_written_twice_on_both_backends(db: Upstream) -> None:
    rows = await db.call(
        call(
            f"SELECT id FROM {TABLE} WHERE sku LIKE 'SKU-%%' AND category = %(c)s ORDER BY id",
            {"c": "office"},
        )
    )
    assert rows == [{"id": 3}]


async def test_binary_values_are_base64_even_when_their_bytes_are_utf8(db: Upstream) -> None:
    row = await db.call(call("SELECT X'C3BC6EC3AF' AS utf8, X'FF00' AS raw", one=True))
    assert row == {"utf8": "w7xuw68=", "raw": "/wA="}


async def test_bad_sql_raises_source_unavailable(db: Upstream) -> None:
    with pytest.raises(SourceUnavailable) as info:
        await db.call(call("SELEC nonsense FROM nowhere"))
    assert not info.value.connect
    assert await db.call(call(BY_ID, {"id": 1}, one=True))  # the source still answers


async def test_a_value_the_driver_cannot_encode_is_unsendable(db: Upstream) -> None:
    with pytest.raises(Unsendable) as info:
        await db.call(call(BY_ID, {"id": "lone \ud800 surrogate"}, one=True))
    assert "UnicodeEncodeError" in str(info.value)
    assert await db.call(call(BY_ID, {"id": 1}, one=True))  # the source still answers


async def test_an_int_beyond_64_bits_is_unsendable_on_sqlite_and_bound_on_mariadb(
    mysql_dsn: str, sqlite_dsn: str
) -> None:
    async with started(sqlite_dsn) as db:
        for value in (2**63, -(2**63) - 1, 2**64, 10**30):
            with pytest.raises(Unsendable, match="OverflowError"):
                await db.call(call(BY_ID, {"id": value}))
        assert await db.call(call(BY_ID, {"id": 2**63 - 1})) == []
    async with started(mysql_dsn) as db:
        assert await db.call(call(BY_ID, {"id": 2**64})) == []


@pytest.mark.parametrize("map_errors", [mysql.map_errors, sqlite.map_errors])
@pytest.mark.parametrize("bug", [AttributeError("x"), KeyError("id"), RuntimeError("y")])
def test_map_errors_lets_bugs_through(map_errors: Any, bug: Exception) -> None:
    with pytest.raises(type(bug)), map_errors("catalog"):
        raise bug


async def test_ping_answers_and_pool_stats_count_connections(db: Upstream) -> None:
    await db.ping()
    stats = dict(db.pool_stats())
    assert set(stats) == {"size", "in_use", "free", "max"}
    assert stats["in_use"] == 0
    assert stats["size"] == stats["free"] >= 1
    assert 1 <= stats["max"] <= 4


# --- MySQL / MariaDB ------------------------------------------------------------------------


async def test_decimal_and_temporal_values_are_json_ready(mysql_dsn: str) -> None:
    async with started(mysql_dsn) as db:
        row = await db.call(
            call("SELECT * FROM sqlsrc_values WHERE id = %(id)s", {"id": 1}, one=True)
        )
    assert row == {
        "id": 1,
        "price": 19.99,
        "created": "2024-05-06T07:08:09.123000",
        "released": "2024-05-06",
        "opens": "-01:02:03",
        "raw": "/wA=",
    }
    assert orjson.loads(orjson.dumps(row)) == row


async def test_an_unreachable_server_is_unavailable_with_connect_set(mysql_dsn: str) -> None:
    dsn = f"mysql://root@127.0.0.1:{free_port()}/nothing"
    start = time.monotonic()
    async with started(dsn) as db:  # starting does not need the database to be up
        with pytest.raises(SourceUnavailable) as info:
            async with asyncio.timeout(5):
                await db.call(call("SELECT 1 AS one", one=True))
        assert info.value.connect
        with pytest.raises(SourceUnavailable):
            await db.ping()
        assert db.pool_stats()["size"] == 0
    assert time.monotonic() - start < 5


async def test_the_dsn_password_is_percent_decoded(mysql_dsn: str) -> None:
    user, password = f"gw_{uuid.uuid4().hex[:8]}", "p@ss:w/rd%?#"
    database = urlsplit(mysql_dsn).path.lstrip("/")
    admin = mysql_connect(mysql_dsn)
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
            cur.execute(f"GRANT SELECT ON `{database}`.* TO %s@'%%'", (user,))
        port = urlsplit(mysql_dsn).port or 3306
        dsn = f"mysql://{user}:{quote(password, safe='')}@127.0.0.1:{port}/{database}"
        async with started(dsn) as db:
            assert await db.call(call(BY_ID, {"id": 3}, one=True)) == {
                "id": 3,
                "sku": "SKU-3",
                "name": "Pen",
                "category": "office",
            }
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        admin.close()


async def test_the_server_stops_a_query_at_its_budget(mysql_dsn: str) -> None:
    async with started(mysql_dsn) as db:
        start = time.monotonic()
        with pytest.raises(SourceTimeout):
            async with asyncio.timeout(0.8):  # later than the server's limit: the server answers
                await db.call(call("SELECT SLEEP(2) AS s", timeout=0.2))
        assert time.monotonic() - start < 1.5
        assert await db.call(call("SELECT 1 AS one", one=True)) == {"one": 1}
        assert db.pool_stats()["in_use"] == 0


MARIADB = "5.5.5-10.11.6-MariaDB-0+deb12u1"


@pytest.mark.parametrize(
    ("version", "sql", "expected"),
    [
        (MARIADB, BY_ID, f"SET STATEMENT max_statement_time=0.250 FOR {BY_ID}"),
        ("11.4.2-MariaDB", "CALL p()", "SET STATEMENT max_statement_time=0.250 FOR CALL p()"),
        ("5.5.5-10.0.38-MariaDB", BY_ID, BY_ID),  # before 10.1.2: no SET STATEMENT
        ("8.0.36", "SELECT 1", "SELECT /*+ MAX_EXECUTION_TIME(250) */ 1"),
        ("8.4.0-commercial", " select\n1", " select /*+ MAX_EXECUTION_TIME(250) */\n1"),
        ("5.7.8-log", "SELECT 1", "SELECT /*+ MAX_EXECUTION_TIME(250) */ 1"),
        ("5.7.7", "SELECT 1", "SELECT 1"),  # before the hint existed
        ("5.6.51", "SELECT 1", "SELECT 1"),
        ("8.0.36", "WITH t AS (SELECT 1) SELECT * FROM t", "WITH t AS (SELECT 1) SELECT * FROM t"),
        ("8.0.36", "SELECTED", "SELECTED"),
        ("8.0.36", "CALL p()", "CALL p()"),
        ("", "SELECT 1", "SELECT 1"),
        ("unknown", "SELECT 1", "SELECT 1"),
    ],
)
def test_the_statement_timeout_follows_the_server_flavour_and_version(
    version: str, sql: str, expected: str
) -> None:
    assert budgeted(sql, 0.25, version) == expected


def test_the_mysql_hint_is_whole_milliseconds_rounded_up() -> None:
    assert budgeted("SELECT 1", 0.0001, "8.0.36") == "SELECT /*+ MAX_EXECUTION_TIME(1) */ 1"
    assert budgeted("SELECT 1", 0.1504, "8.0.36") == "SELECT /*+ MAX_EXECUTION_TIME(151) */ 1"


def test_the_real_server_is_mariadb_and_runs_both_forms(mysql_dsn: str) -> None:
    conn = mysql_connect(mysql_dsn)
    try:
        version = conn.get_server_info()
        assert budgeted("SELECT 1", 0.5, version).startswith("SET STATEMENT max_statement_time=")
        # MariaDB reads a MySQL optimizer hint as a comment: the MySQL form is at least valid SQL.
        with conn.cursor() as cur:
            for flavour in (version, "8.0.36"):
                cur.execute(budgeted(BY_ID, 0.5, flavour), {"id": 2})
                assert cur.fetchall() == ((2, "SKU-2", "Chair", "home"),)
    finally:
        conn.close()


async def test_the_budget_counts_down_to_the_deadline(mysql_dsn: str) -> None:
    async with started(mysql_dsn) as db:
        start = time.monotonic()
        c = call("SELECT SLEEP(2) AS s", timeout=5.0)
        tight = Call(
            source=c.source,
            name=c.name,
            target=c.target,
            params=c.params,
            timeout=5.0,
            deadline=asyncio.get_running_loop().time() + 0.2,
        )
        with pytest.raises((SourceTimeout, TimeoutError)):
            async with asyncio.timeout(0.25):
                await db.call(tight)
        assert time.monotonic() - start < 1.5


async def test_a_query_cancelled_mid_flight_never_hands_its_rows_to_another(mysql_dsn: str) -> None:
    async with started(mysql_dsn, pool_min=1, pool_max=4) as db:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await db.call(call("SELECT -1 AS id, SLEEP(0.5) AS s", timeout=5.0))
        assert db.pool_stats()["in_use"] == 0

        async def own(i: int) -> Any:
            return await db.call(
                call(
                    "SELECT %(id)s AS id, %(sku)s AS sku, SLEEP(0.05) AS s",
                    {"id": i, "sku": f"SKU-{i}"},
                    one=True,
                )
            )

        async with asyncio.timeout(10):
            rows = await asyncio.gather(*(own(i) for i in range(50)))
        assert rows == [{"id": i, "sku": f"SKU-{i}", "s": 0} for i in range(50)]
        stats = db.pool_stats()
        assert stats["in_use"] == 0
        assert 1 <= stats["size"] <= 4


async def test_waiting_for_a_pool_connection_counts_against_the_timeout(mysql_dsn: str) -> None:
    async with started(mysql_dsn, pool_min=1, pool_max=1) as db:
        holder = asyncio.ensure_future(db.call(call("SELECT SLEEP(0.6) AS s", timeout=5.0)))
        await asyncio.sleep(0.1)
        assert db.pool_stats()["in_use"] == 1
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await db.call(call("SELECT 1 AS one"))
        assert time.monotonic() - start < 0.5
        assert await holder == [{"s": 0}]
        assert await db.call(call("SELECT 2 AS two", one=True)) == {"two": 2}
        assert db.pool_stats() == {"size": 1, "in_use": 0, "free": 1, "max": 1}


async def test_a_waiter_gets_the_slot_a_cancelled_call_gave_up(mysql_dsn: str) -> None:
    async with started(mysql_dsn, pool_min=1, pool_max=1) as db:

        async def cancelled_holder() -> None:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await db.call(call("SELECT SLEEP(2) AS s", timeout=5.0))

        async def waiter() -> Any:
            await asyncio.sleep(0.05)
            async with asyncio.timeout(1.5):
                return await db.call(call("SELECT 7 AS seven", one=True))

        start = time.monotonic()
        _, row = await asyncio.gather(cancelled_holder(), waiter())
        assert row == {"seven": 7}
        assert time.monotonic() - start < 1.5
        assert db.pool_stats()["size"] <= 1


# --- SQLite ---------------------------------------------------------------------------------


async def test_a_cancelled_sqlite_query_is_interrupted_and_others_get_their_rows(
    sqlite_dsn: str,
) -> None:
    # One connection: the 50 queries must wait for the cancelled statement unless it was stopped.
    async with started(sqlite_dsn, pool_max=1) as db:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await db.call(call(SLOW_SQLITE, one=True))

        async def own(i: int) -> Any:
            return await db.call(
                call("SELECT %(id)s AS id, %(sku)s AS sku", {"id": i, "sku": f"SKU-{i}"}, one=True)
            )

        start = time.monotonic()
        async with asyncio.timeout(10):
            rows = await asyncio.gather(*(own(i) for i in range(50)))
        assert rows == [{"id": i, "sku": f"SKU-{i}"} for i in range(50)]
        assert time.monotonic() - start < 2  # the slow statement was stopped, not waited out
        assert db.pool_stats() == {"size": 1, "in_use": 0, "free": 1, "max": 1}


async def test_sqlite_queries_run_in_parallel_across_its_connections(sqlite_dsn: str) -> None:
    async with started(sqlite_dsn, pool_max=10) as db:
        assert db.pool_stats() == {"size": 4, "in_use": 0, "free": 4, "max": 4}  # capped at 4
        slow = [asyncio.create_task(db.call(call(SLOW_SQLITE, one=True))) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert db.pool_stats()["in_use"] == 3
        # A fourth connection is still free: a quick query is not stuck behind the slow ones.
        start = time.monotonic()
        assert await db.call(call("SELECT 7 AS n", one=True)) == {"n": 7}
        assert time.monotonic() - start < 0.5
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)


async def test_a_failing_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable):
        await sql_source("catalog", _config(f"sqlite:///{tmp_path}/missing/dir/x.db"))


def test_the_one_private_aiomysql_name_the_adapter_uses_still_exists() -> None:
    # upstreams/mysql.py wakes a pool waiter after releasing a closed connection with
    # `Pool._wakeup()` (aiomysql has no public way to): a release that drops it must fail here,
    # by name, not as calls that wait out their timeout.
    import aiomysql

    assert inspect.iscoroutinefunction(getattr(aiomysql.Pool, "_wakeup", None)), (
        "aiomysql.Pool._wakeup is gone: upstreams/mysql.py _borrow needs another way to wake a "
        "waiter after a closed connection is released"
    )
