"""SQL batches against the real MariaDB, PostgreSQL and a temporary SQLite file: a batch's ids
are bound values, one placeholder each, so hostile ids find nothing and break nothing.

Each test runs once per database; `-k mariadb`, `-k postgres` or `-k sqlite` selects one.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config.kinds import Kind, SqlSourceConfig
from gateway.config.schema import BatchConfig, EndpointConfig
from gateway.core.batch import Batch
from gateway.core.context import RequestContext
from gateway.core.errors import Unsendable
from gateway.core.plan import build_plan, compile_source, open_upstream
from gateway.core.types import JSON, Call, Upstream
from tests.support import mysql_connect, pg_execute

TABLE = "sqlbatch_items"
ROWS = [
    (1, "SKU-1", "Lamp"),
    (2, "SKU-2", "Chair"),
    (3, "SKU-3", "Pen"),
    (4, "SKU-4", "Desk"),
    (5, "SKU-5", "Shelf"),
]
CREATE = f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, sku VARCHAR(40), name VARCHAR(100))"
BY_SKU = BatchConfig(query=f"SELECT id, sku, name FROM {TABLE} WHERE sku IN %(sku*)s", key="sku")
BY_ID = BatchConfig(query=f"SELECT id, sku, name FROM {TABLE} WHERE id IN %(id*)s", key="id")
HOSTILE = [
    "x' OR '1'='1",
    f"'); DROP TABLE {TABLE}; --",
    "%(sku)s",
    "?",
    ":sku",
    "$1",
    "\\",
    "A" * 300,
    "é",
    "",
]


def _insert_values() -> str:
    return ", ".join(f"({i}, '{sku}', '{name}')" for i, sku, name in ROWS)


@pytest.fixture(scope="module")
def mariadb_dsn(mysql_url: str) -> Iterator[str]:
    """The session MariaDB database with this module's table in it."""
    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(CREATE)
        cur.execute(f"INSERT INTO {TABLE} VALUES {_insert_values()}")
    try:
        yield mysql_url
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.close()


@pytest.fixture(scope="module")
def postgres_dsn(postgres_url: str) -> Iterator[str]:
    """The session PostgreSQL database with this module's table in it."""
    asyncio.run(pg_execute(postgres_url, CREATE, f"INSERT INTO {TABLE} VALUES {_insert_values()}"))
    try:
        yield postgres_url
    finally:
        asyncio.run(pg_execute(postgres_url, f"DROP TABLE IF EXISTS {TABLE}"))


@pytest.fixture
def sqlite_dsn(tmp_path: Path) -> str:
    """A SQLite file holding the same table."""
    path = tmp_path / "items.db"
    conn = sqlite3.connect(path)
    conn.execute(CREATE)
    conn.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?)", ROWS)
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


@dataclass(frozen=True)
class Db:
    """A started source and the row of the kind table its DSN chose."""

    kind: Kind
    upstream: Upstream
    dsn: str

    async def batch(self, batch: BatchConfig, param: str, ids: Sequence[Any]) -> list[JSON]:
        """Render `ids` with the kind's batch renderer, run it, and return the rows by id."""
        target, params = self.kind.render_batch(batch, param)(ids)
        rows = await self.upstream.call(_call(target, params))
        assert isinstance(rows, list)
        return sorted(rows, key=lambda row: row["id"])

    async def count(self) -> int:
        (row,) = await self.upstream.call(_call(f"SELECT count(*) AS n FROM {TABLE}", {}))
        return int(row["n"])


def _call(target: str, params: Any) -> Call:
    return Call(
        source="catalog",
        name="product",
        target=target,
        params=params,
        timeout=10.0,
        deadline=asyncio.get_running_loop().time() + 10.0,
        one=False,
    )


@pytest.fixture(params=["mariadb", "postgres", "sqlite"])
def dsn(request: pytest.FixtureRequest) -> str:
    """The DSN of each database in turn, its table made (outside the test's event loop)."""
    value: str = request.getfixturevalue(f"{request.param}_dsn")
    return value


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[Db]:
    """A source over the table, opened through the kind table; closed afterwards."""
    plan = compile_source("catalog", SqlSourceConfig(kind="sql", dsn=dsn, timeout_ms=10_000))
    upstream = await open_upstream("catalog", plan)
    try:
        yield Db(plan.kind, upstream, dsn)
    finally:
        await upstream.close()


def _rows(*ids: int) -> list[JSON]:
    return [{"id": i, "sku": sku, "name": name} for i, sku, name in ROWS if i in ids]


async def test_a_batch_returns_the_rows_of_the_known_skus(db: Db) -> None:
    rows = await db.batch(BY_SKU, "sku", ["SKU-3", "SKU-1", "SKU-404", "SKU-5"])
    assert rows == _rows(1, 3, 5)


async def test_a_batch_of_one_id_returns_its_row(db: Db) -> None:
    assert await db.batch(BY_SKU, "sku", ["SKU-2"]) == _rows(2)


@pytest.mark.parametrize("hostile", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
async def test_a_hostile_id_is_a_value_that_matches_nothing(db: Db, hostile: str) -> None:
    assert await db.batch(BY_SKU, "sku", ["SKU-2", hostile, "SKU-4"]) == _rows(2, 4)
    assert await db.batch(BY_SKU, "sku", [hostile]) == []
    assert await db.count() == len(ROWS)


async def test_all_hostile_ids_in_one_batch_match_nothing_and_drop_nothing(db: Db) -> None:
    assert await db.batch(BY_SKU, "sku", [*HOSTILE, "SKU-1"]) == _rows(1)
    # The same ids again: the rendered text of this size is reused, the values are new.
    assert await db.batch(BY_SKU, "sku", [*HOSTILE, "SKU-5"]) == _rows(5)
    assert await db.count() == len(ROWS)
    assert await db.batch(BY_SKU, "sku", [sku for _, sku, _ in ROWS]) == _rows(1, 2, 3, 4, 5)


async def test_a_batch_of_1000_ids_binds_them_all(db: Db) -> None:
    ids = [f"missing-{i}" for i in range(995)] + [sku for _, sku, _ in ROWS]
    assert len(ids) == 1000  # batch.max's upper bound
    assert await db.batch(BY_SKU, "sku", ids) == _rows(1, 2, 3, 4, 5)
    assert await db.count() == len(ROWS)


async def test_int_ids_bind_as_ints_up_to_64_bits(db: Db) -> None:
    # 2**62 is a valid `{id:int}` (gateway ints are 64-bit) past this INT column's range:
    # MariaDB and SQLite find nothing for it; PostgreSQL refuses the whole statement.
    if db.kind.scheme == "postgresql":
        with pytest.raises(Unsendable):
            await db.batch(BY_ID, "id", [1, 2, 2**62])
    else:
        assert await db.batch(BY_ID, "id", [1, 2, 2**62]) == _rows(1, 2)
    assert await db.batch(BY_ID, "id", [2, 2]) == _rows(2)


async def test_an_id_the_driver_cannot_bind_costs_only_its_own_item(db: Db) -> None:
    # Through the listing's batch layer: the item endpoint's plan, its batched call sent once
    # per chunk; an unbindable id is split off (PostgreSQL) and fails alone.
    endpoint = EndpointConfig.model_validate(
        {
            "path": "/items/{id:int}",
            "calls": {
                "item": {
                    "source": "catalog",
                    "query": f"SELECT id, sku, name FROM {TABLE} WHERE id = %(id)s",
                    "one": True,
                    "required": True,
                    "batch": BY_ID.model_dump(),
                }
            },
        }
    )
    source = SqlSourceConfig(kind="sql", dsn=db.dsn, timeout_ms=10_000)
    plan = build_plan(endpoint, {"catalog": source})
    seen: list[str] = []

    async def counted(call: Call) -> JSON:
        seen.append(call.target)
        return await db.upstream.call(call)

    batch = Batch(plan, {"catalog": counted}, lambda plan, composite: None)
    loop = asyncio.get_running_loop()
    ctx = RequestContext("", loop.time(), {})
    ids = [1, 2**62, 2, 3, 99]
    entries = await batch.run(ctx, ids, loop.time() + 10, [])
    assert [entries[i].status for i in ids] == [
        200,
        404 if db.kind.scheme != "postgresql" else 502,
        200,
        200,
        404,
    ]
    assert orjson.loads(entries[3].body)["item"] == _rows(3)[0]
    if db.kind.scheme == "postgresql":
        assert len(seen) > 1  # halved until the bad id was alone
    else:
        assert len(seen) == 1
