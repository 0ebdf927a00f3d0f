"""SQL results as teams rely on them, on the real MariaDB, PostgreSQL and SQLite: JSON columns as
JSON values, binary columns as base64 always (text stays text whatever its collation), and
`max_rows` read without reading the whole result; `max_rows` on an http call is a config error."""

from __future__ import annotations

import asyncio
import base64
import inspect
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from gateway.config import loader as config
from gateway.config.kinds import KINDS
from gateway.core.errors import BadPayload, ConfigError
from gateway.core.types import Call, Upstream
from tests.support import mysql_connect, pg_execute
from upstreams.sql import SqlPoolSettings, SqlSettings

MANY = 100_000
JSON_ROWS = [
    (1, '{"a": {"b": [1, 2.5, null]}, "s": "x"}'),
    (2, '[1, "two", true, {}]'),
    (3, '"just text"'),
    (4, "42"),
    (5, "null"),
    (6, None),
]
JSON_VALUES = {
    1: {"a": {"b": [1, 2.5, None]}, "s": "x"},
    2: [1, "two", True, {}],
    3: "just text",
    4: 42,
    5: None,
    6: None,
}
# ASCII bytes, non-UTF-8 bytes, and bytes that are valid UTF-8: base64 all the same.
BINARY = {"ascii": b"abcd", "raw": b"\xff\x00\xfe", "utf8": "\u00fcn".encode()}
BINARY_B64 = {"ascii": "YWJjZA==", "raw": "/wD+", "utf8": "w7xu"}


def call(sql: str, params: dict[str, Any] | None = None, *, max_rows: int = 1000) -> Call:
    loop = asyncio.get_running_loop()
    return Call(
        source="db",
        name="rows",
        target=sql,
        params=params or {},
        timeout=10.0,
        deadline=loop.time() + 10.0,
        max_rows=max_rows,
    )


@asynccontextmanager
async def started(dsn: str) -> AsyncIterator[Upstream]:
    """The adapter the table of source kinds gives the DSN's scheme, started and then closed."""
    kind = KINDS[("sql", urlsplit(dsn).scheme)]
    upstream = await kind.open("db", SqlSettings(dsn, SqlPoolSettings(min=1, max=2)))
    try:
        yield upstream
    finally:
        await upstream.close()


# --- MariaDB ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maria(mysql_url: str) -> Iterator[str]:
    """The session database with a JSON table, a binary table and a 100,000-row table."""
    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE sqlval_docs (id INT PRIMARY KEY, doc JSON, "
            "note LONGTEXT COLLATE utf8mb4_bin, plain LONGTEXT)"
        )
        cur.executemany(
            "INSERT INTO sqlval_docs VALUES (%s, %s, %s, %s)",
            [(i, doc, doc, doc) for i, doc in JSON_ROWS],
        )
        cur.execute(
            "CREATE TABLE sqlval_bytes (id INT PRIMARY KEY, vb VARBINARY(8), fixed BINARY(4), "
            "bl BLOB, code VARCHAR(10) COLLATE utf8mb4_bin, tag CHAR(4) CHARACTER SET ascii "
            "COLLATE ascii_bin)"
        )
        cur.executemany(
            "INSERT INTO sqlval_bytes VALUES (%s, %s, %s, %s, 'AbC', 'Tag1')",
            [(n, value, value, value) for n, value in enumerate(BINARY.values())],
        )
        cur.execute("CREATE TABLE sqlval_many (n INT PRIMARY KEY)")
        cur.execute(f"INSERT INTO sqlval_many SELECT seq FROM seq_1_to_{MANY}")
        cur.execute("CREATE SEQUENCE sqlval_produced")
    try:
        yield mysql_url
    finally:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS sqlval_docs, sqlval_bytes, sqlval_many")
            cur.execute("DROP SEQUENCE IF EXISTS sqlval_produced")
        conn.close()


async def test_mariadb_json_columns_are_json_values_and_null_stays_null(maria: str) -> None:
    async with started(maria) as db:
        rows = await db.call(call("SELECT id, doc FROM sqlval_docs ORDER BY id"))
        assert {r["id"]: r["doc"] for r in rows} == JSON_VALUES
        # An alias, a table alias: the column still comes from the table's JSON column.
        rows = await db.call(call("SELECT d.doc AS body FROM sqlval_docs AS d WHERE d.id = 1"))
        assert rows == [{"body": JSON_VALUES[1]}]
        # Two columns of one name: the second's key is `table.name`, as aiomysql gives it.
        rows = await db.call(
            call(
                "SELECT a.doc, b.doc FROM sqlval_docs AS a JOIN sqlval_docs AS b "
                "ON b.id = a.id + 1 WHERE a.id = 1"
            )
        )
        assert rows == [{"doc": JSON_VALUES[1], "b.doc": JSON_VALUES[2]}]


async def test_mariadb_longtext_stays_text_even_with_a_binary_collation(maria: str) -> None:
    """Decided by the table's json_valid CHECK, never by whether the text parses as JSON."""
    async with started(maria) as db:
        rows = await db.call(call("SELECT note, plain FROM sqlval_docs WHERE id IN (1, 4)"))
        assert rows == [
            {"note": JSON_ROWS[0][1], "plain": JSON_ROWS[0][1]},
            {"note": "42", "plain": "42"},
        ]


async def test_mariadb_json_built_by_functions_is_text_as_documented(maria: str) -> None:
    async with started(maria) as db:
        row = await db.call(call("SELECT JSON_OBJECT('k', 1) AS built"))
        assert row == [{"built": '{"k": 1}'}]


async def test_mariadb_binary_columns_are_base64_and_text_stays_text(maria: str) -> None:
    async with started(maria) as db:
        rows = await db.call(call("SELECT vb, fixed, bl, code, tag FROM sqlval_bytes ORDER BY id"))
    padded = [value.ljust(4, b"\x00") for value in BINARY.values()]
    assert [r["vb"] for r in rows] == list(BINARY_B64.values())
    assert [r["bl"] for r in rows] == list(BINARY_B64.values())
    assert [r["fixed"] for r in rows] == [base64.b64encode(value).decode() for value in padded]
    assert {(r["code"], r["tag"]) for r in rows} == {("AbC", "Tag1")}


async def test_mariadb_max_rows_at_the_limit_passes_and_one_over_fails(maria: str) -> None:
    sql = "SELECT id FROM sqlval_docs ORDER BY id"
    async with started(maria) as db:
        assert len(await db.call(call(sql, max_rows=len(JSON_ROWS)))) == len(JSON_ROWS)
        size = db.pool_stats()["size"]
        with pytest.raises(BadPayload, match=rf"over max_rows {len(JSON_ROWS) - 1}$"):
            await db.call(call(sql, max_rows=len(JSON_ROWS) - 1))
        # The server stopped at max_rows + 1 rows: the reply was read whole, the connection kept.
        assert db.pool_stats()["size"] == size
        assert len(await db.call(call(sql))) == len(JSON_ROWS)


async def test_mariadb_a_huge_result_fails_after_max_rows_plus_one_rows(maria: str) -> None:
    async with started(maria) as db:
        with pytest.raises(BadPayload, match=r"over max_rows 1000$"):
            await db.call(
                call("SELECT n, NEXTVAL(sqlval_produced) AS k FROM sqlval_many ORDER BY n")
            )
        # How many rows the server made: the sequence advanced once per row produced.
        produced = await db.call(call("SELECT NEXTVAL(sqlval_produced) - 1 AS n"))
    assert produced == [{"n": 1001}]


async def test_mysql_unbuffered_reading_without_a_server_cap_still_stops(maria: str) -> None:
    """Without MariaDB's sql_select_limit (as on MySQL) the adapter reads max_rows + 1 rows and
    leaves the rest unread; its connection is closed, and the next call gets a fresh one."""
    async with started(maria) as db:
        size = db.pool_stats()["size"]
        with pytest.raises(BadPayload, match=r"over max_rows 10$"):
            # A LIMIT of the query's own wins over sql_select_limit: the server sends them all.
            await db.call(call(f"SELECT n FROM sqlval_many LIMIT {MANY}", max_rows=10))
        assert db.pool_stats()["size"] == size - 1
        assert await db.call(call("SELECT COUNT(*) AS c FROM sqlval_many")) == [{"c": MANY}]


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg(postgres_url: str) -> str:
    """The session database with json/jsonb, bytea and a 100,000-row table."""
    docs = ", ".join(
        f"({i}, {_pg_text(doc)}::json, {_pg_text(doc)}::jsonb, {_pg_text(doc)})"
        for i, doc in JSON_ROWS
    )
    raws = ", ".join(f"({n}, '\\x{value.hex()}'::bytea)" for n, value in enumerate(BINARY.values()))
    asyncio.run(
        pg_execute(
            postgres_url,
            "CREATE TABLE sqlval_docs (id INT PRIMARY KEY, j JSON, jb JSONB, "
            'note TEXT COLLATE "C")',
            f"INSERT INTO sqlval_docs VALUES {docs}",
            "CREATE TABLE sqlval_bytes (id INT PRIMARY KEY, raw BYTEA)",
            f"INSERT INTO sqlval_bytes VALUES {raws}",
            "CREATE TABLE sqlval_many (n INT PRIMARY KEY)",
            f"INSERT INTO sqlval_many SELECT generate_series(1, {MANY})",
            "CREATE SEQUENCE sqlval_produced",
        )
    )
    return postgres_url


def _pg_text(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


async def test_postgres_json_and_jsonb_are_json_values_and_text_stays_text(pg: str) -> None:
    async with started(pg) as db:
        rows = await db.call(call("SELECT id, j, jb, note FROM sqlval_docs ORDER BY id"))
        assert {r["id"]: r["j"] for r in rows} == JSON_VALUES
        assert {r["id"]: r["jb"] for r in rows} == JSON_VALUES
        assert [r["note"] for r in rows] == [doc for _, doc in JSON_ROWS]
        arrays = await db.call(call("SELECT ARRAY[jb, jb] AS pair FROM sqlval_docs WHERE id = 2"))
        assert arrays == [{"pair": [JSON_VALUES[2], JSON_VALUES[2]]}]


async def test_postgres_a_text_parameter_bound_to_jsonb_is_taken_as_json(pg: str) -> None:
    async with started(pg) as db:
        rows = await db.call(
            call(
                "SELECT id FROM sqlval_docs WHERE jb @> $1::jsonb ORDER BY id",
                {"doc": '{"s": "x"}'},
            )
        )
    assert rows == [{"id": 1}]


async def test_postgres_a_json_number_beyond_a_double_is_bad_payload_not_unsendable(
    pg: str,
) -> None:
    async with started(pg) as db:
        with pytest.raises(BadPayload, match="column jsonb is not JSON"):
            await db.call(call("SELECT '1e400'::jsonb AS x"))
        # The connection read the rest of that reply: it answers the next call.
        assert await db.call(call("SELECT '[1]'::jsonb AS x")) == [{"x": [1]}]


async def test_postgres_bytea_is_base64_whatever_its_bytes(pg: str) -> None:
    async with started(pg) as db:
        rows = await db.call(call("SELECT raw FROM sqlval_bytes ORDER BY id"))
    assert [r["raw"] for r in rows] == list(BINARY_B64.values())


async def test_postgres_max_rows_at_the_limit_passes_and_one_over_fails(pg: str) -> None:
    sql = "SELECT id FROM sqlval_docs ORDER BY id"
    async with started(pg) as db:
        assert len(await db.call(call(sql, max_rows=len(JSON_ROWS)))) == len(JSON_ROWS)
        with pytest.raises(BadPayload, match=rf"over max_rows {len(JSON_ROWS) - 1}$"):
            await db.call(call(sql, max_rows=len(JSON_ROWS) - 1))
        assert len(await db.call(call(sql))) == len(JSON_ROWS)


async def test_postgres_a_huge_result_fails_after_max_rows_plus_one_rows(pg: str) -> None:
    async with started(pg) as db:
        with pytest.raises(BadPayload, match=r"over max_rows 1000$"):
            await db.call(call("SELECT n, nextval('sqlval_produced') FROM sqlval_many ORDER BY n"))
        produced = await db.call(call("SELECT nextval('sqlval_produced') - 1 AS n"))
    assert produced == [{"n": 1001}]


def test_the_private_asyncpg_fetch_with_a_row_limit_still_exists() -> None:
    """upstreams.postgresql calls `Connection._execute(query, args, limit, timeout)`: a release
    that renames it fails here by name."""
    parameters = list(inspect.signature(asyncpg.Connection._execute).parameters)
    assert parameters[:5] == ["self", "query", "args", "limit", "timeout"]


# --- SQLite -------------------------------------------------------------------------------------


@pytest.fixture
def lite(tmp_path: Path) -> str:
    """A SQLite file with JSON in a TEXT column, blobs and a 100,000-row table."""
    path = tmp_path / "values.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, doc TEXT)")
    conn.executemany("INSERT INTO docs VALUES (?, ?)", JSON_ROWS)
    conn.execute("CREATE TABLE bytes (id INTEGER PRIMARY KEY, raw BLOB, note TEXT)")
    conn.executemany("INSERT INTO bytes VALUES (?, ?, 'AbC')", list(enumerate(BINARY.values())))
    conn.execute("CREATE TABLE many (n INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO many VALUES (?)", ((n,) for n in range(1, MANY + 1)))
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


async def test_sqlite_json_stays_text_as_documented(lite: str) -> None:
    async with started(lite) as db:
        rows = await db.call(call("SELECT id, doc FROM docs ORDER BY id"))
    assert [r["doc"] for r in rows] == [doc for _, doc in JSON_ROWS]


async def test_sqlite_blobs_are_base64_and_text_stays_text(lite: str) -> None:
    async with started(lite) as db:
        rows = await db.call(call("SELECT raw, note FROM bytes ORDER BY id"))
    assert [r["raw"] for r in rows] == list(BINARY_B64.values())
    assert {r["note"] for r in rows} == {"AbC"}


async def test_sqlite_max_rows_at_the_limit_passes_and_one_over_fails(lite: str) -> None:
    sql = "SELECT id FROM docs ORDER BY id"
    async with started(lite) as db:
        assert len(await db.call(call(sql, max_rows=len(JSON_ROWS)))) == len(JSON_ROWS)
        with pytest.raises(BadPayload, match=rf"over max_rows {len(JSON_ROWS) - 1}$"):
            await db.call(call(sql, max_rows=len(JSON_ROWS) - 1))
        with pytest.raises(BadPayload, match=r"over max_rows 1000$"):
            await db.call(call("SELECT n FROM many ORDER BY n"))


async def test_sqlite_a_result_that_never_ends_fails_at_max_rows_not_at_its_timeout(
    lite: str,
) -> None:
    """An endless recursive query: reading it whole would never end; max_rows + 1 rows do."""
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    async with started(lite) as db:
        with pytest.raises(BadPayload, match=r"over max_rows 1000$"):
            await db.call(call(endless))


# --- config -------------------------------------------------------------------------------------

CONFIG = """\
version: 1
sources:
  catalog: {kind: sql, dsn: "sqlite:///tmp/x.db", timeout_ms: 100}
  pricing: {kind: http, base_url: "http://127.0.0.1:9101", timeout_ms: 100}
endpoints:
  - path: /products/{id:int}
    calls:
      product:
        source: catalog
        query: "SELECT id FROM products WHERE id = %(id)s"
        max_rows: 10
      price:
        source: pricing
        path: /prices/{id}
        max_rows: 1000
"""


def test_max_rows_on_an_http_call_is_a_located_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        config.loads(CONFIG, "gw.yaml", {})
    line = CONFIG.splitlines().index("        max_rows: 1000") + 1
    assert [str(p) for p in info.value.problems] == [
        f"gw.yaml:{line}: endpoints.0.calls.price.max_rows: only sql calls take max_rows"
    ]


def test_max_rows_on_a_sql_call_and_its_default_on_an_http_call_are_fine() -> None:
    loaded = config.loads(CONFIG.replace("        max_rows: 1000\n", ""), "gw.yaml", {})
    calls = loaded.config.endpoints[0].calls
    assert (calls["product"].max_rows, calls["price"].max_rows) == (10, 1000)
