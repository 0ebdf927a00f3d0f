"""The PostgreSQL source against the real PostgreSQL (a throwaway database per test session)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from gateway.config import loader as config
from gateway.config.kinds import KINDS
from gateway.core.errors import ConfigError, NotFound, SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.plan import build_plans, compile_source, open_upstream
from gateway.core.types import Call, Upstream
from tests.support import free_port, pg_execute
from upstreams.postgresql import map_errors, positional, postgresql_source
from upstreams.sql import SqlPoolSettings, SqlSettings

TABLE = "pgsrc_products"
ROWS = [(1, "SKU-1", "Lamp", "home"), (2, "SKU-2", "Chair", "home"), (3, "SKU-3", "Pen", "office")]
BY_ID = f"SELECT id, sku, name, category FROM {TABLE} WHERE id = %(id)s"
BY_CATEGORY = f"SELECT id, sku FROM {TABLE} WHERE category = %(category)s ORDER BY id"
VALUE_ID = "7d9a7a52-3f0c-4d8e-9a36-5b1f2f9e0c11"


@pytest.fixture(scope="module")
def pg_dsn(postgres_url: str) -> str:
    """The session database with this module's tables in it."""
    asyncio.run(
        pg_execute(
            postgres_url,
            f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, sku TEXT, name TEXT, category TEXT)",
            f"INSERT INTO {TABLE} VALUES "
            + ", ".join(f"({i}, '{s}', '{n}', '{c}')" for i, s, n, c in ROWS),
            "CREATE TABLE pgsrc_values (id INT PRIMARY KEY, price NUMERIC(10, 2), "
            "created TIMESTAMP(3), created_tz TIMESTAMPTZ, released DATE, opens TIME, "
            "lasts INTERVAL, ref UUID, doc JSONB, raw BYTEA, tags TEXT[], prices NUMERIC[], "
            "addr INET)",
            "INSERT INTO pgsrc_values VALUES (1, 19.99, '2024-05-06 07:08:09.123', "
            "'2024-05-06 07:08:09+00', '2024-05-06', '07:08:09', '-01:02:03', "
            f"'{VALUE_ID}', '{{\"a\": [1, 2]}}', '\\xff00', '{{x,y}}', '{{1.50,2}}', "
            "'10.0.0.1')",
        )
    )
    return postgres_url


@asynccontextmanager
async def started(dsn: str, *, pool_min: int = 1, pool_max: int = 4) -> AsyncIterator[Upstream]:
    """A started PostgreSQL source, closed afterwards."""
    settings = SqlSettings(dsn, SqlPoolSettings(min=pool_min, max=pool_max))
    upstream = await postgresql_source("catalog", settings)
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Upstream]:
    async with started(pg_dsn) as upstream:
        yield upstream


def call(
    sql: str, params: dict[str, Any] | None = None, *, one: bool = False, timeout: float = 5.0
) -> Call:
    """A call as the plan renders it: `$n` placeholders and the parameters in their order."""
    target, names = positional(sql)
    given = params or {}
    return Call(
        source="catalog",
        name="product",
        target=target,
        params={n: given[n] for n in names},
        timeout=timeout,
        deadline=asyncio.get_running_loop().time() + timeout,
        one=one,
    )


async def _running(dsn: str, marker: str) -> int:
    rows = await pg_execute(
        dsn,
        "SELECT count(*) AS n FROM pg_stat_activity "
        f"WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()",
    )
    return int(rows[0]["n"])


async def _until_none_running(dsn: str, marker: str) -> int:
    # The server ends a cancelled statement a moment after the cancel request: poll, bounded.
    for _ in range(100):
        if (n := await _running(dsn, marker)) == 0:
            return 0
        await asyncio.sleep(0.05)
    return n


# --- placeholders ----------------------------------------------------------------------------


def test_placeholders_become_numbered_once_per_name_and_a_double_percent_one_percent() -> None:
    sql = "SELECT %(a)s, %(b)s, %(a)s WHERE x LIKE 'a%%'"
    assert positional(sql) == ("SELECT $1, $2, $1 WHERE x LIKE 'a%'", ("a", "b"))


def test_the_plan_translates_the_query_once_and_binds_parameters_in_order() -> None:
    text = f"""
sources:
  catalog: {{kind: sql, dsn: "postgresql://root@127.0.0.1:5432/db", timeout_ms: 100}}
endpoints:
  - path: /products/{{id:int}}
    calls:
      product:
        source: catalog
        query: "SELECT * FROM {TABLE} WHERE category = %(cat)s AND id = %(id)s OR id = %(id)s"
        args: {{cat: "home"}}
"""
    plan = build_plans(config.loads(text, "t.yaml", {}).config)[0]
    target, params = plan.calls[0].render({"id": 7})
    assert target == f"SELECT * FROM {TABLE} WHERE category = $1 AND id = $2 OR id = $2"
    assert list(params.items()) == [("cat", "home"), ("id", 7)]


def test_the_table_has_one_row_per_sql_scheme_and_an_unknown_one_is_a_config_error() -> None:
    assert {s for k, s in KINDS if k == "sql"} == {"mysql", "sqlite", "postgresql"}
    text = """
sources:
  catalog: {kind: sql, dsn: "oracle://db/x"}
  other: {kind: sql, dsn: "postgresql:///nohost"}
  third: {kind: grpc, base_url: "http://x"}
endpoints:
  - path: /p
    calls: {p: {source: catalog, query: "SELECT 1"}}
"""
    with pytest.raises(ConfigError) as info:
        config.loads(text, "t.yaml", {})
    found = {(p.line, p.path): p.message for p in info.value.problems}
    assert "postgresql://" in found[(3, "sources.catalog.dsn")]
    assert found[(4, "sources.other.dsn")] == "a postgresql:// DSN needs a host"
    assert found[(5, "sources.third.kind")] == "kind must be one of: http, sql"


# --- the adapter -----------------------------------------------------------------------------


async def test_one_returns_the_first_row_as_a_dict(db: Upstream) -> None:
    row = await db.call(call(BY_ID, {"id": 2}, one=True))
    assert row == {"id": 2, "sku": "SKU-2", "name": "Chair", "category": "home"}


async def test_list_returns_every_row_in_query_order_and_one_without_a_row_is_not_found(
    db: Upstream,
) -> None:
    rows = await db.call(call(BY_CATEGORY, {"category": "home"}))
    assert rows == [{"id": 1, "sku": "SKU-1"}, {"id": 2, "sku": "SKU-2"}]
    assert await db.call(call(BY_CATEGORY, {"category": "none"})) == []
    with pytest.raises(NotFound):
        await db.call(call(BY_ID, {"id": 99}, one=True))


async def test_parameters_are_bound_so_injection_payloads_find_nothing(db: Upstream) -> None:
    for payload in ("home' OR '1'='1", "home'; DROP TABLE pgsrc_products; --", "%(x)s"):
        assert await db.call(call(BY_CATEGORY, {"category": payload})) == []
    assert len(await db.call(call(f"SELECT id FROM {TABLE}"))) == 3


async def test_a_literal_percent_is_written_twice(db: Upstream) -> None:
    rows = await db.call(call(f"SELECT sku FROM {TABLE} WHERE sku LIKE 'SKU-%%' ORDER BY id"))
    assert [r["sku"] for r in rows] == ["SKU-1", "SKU-2", "SKU-3"]


async def test_values_are_json_ready_as_the_mysql_adapter_gives_them(db: Upstream) -> None:
    row = await db.call(call("SELECT * FROM pgsrc_values WHERE id = 1", one=True))
    assert row == {
        "id": 1,
        "price": 19.99,
        "created": "2024-05-06T07:08:09.123000",
        "created_tz": "2024-05-06T07:08:09+00:00",
        "released": "2024-05-06",
        "opens": "07:08:09",
        "lasts": "-01:02:03",
        "ref": VALUE_ID,
        "doc": {"a": [1, 2]},
        "raw": "/wA=",
        "tags": ["x", "y"],
        "prices": [1.5, 2.0],
        "addr": "10.0.0.1",
    }
    orjson.dumps(row)


async def test_bad_sql_is_unavailable_and_the_connection_answers_again(db: Upstream) -> None:
    with pytest.raises(SourceUnavailable) as info:
        await db.call(call("SELECT nope FROM nowhere"))
    assert not info.value.connect
    assert await db.call(call(BY_ID, {"id": 1}, one=True)) == {
        "id": 1,
        "sku": "SKU-1",
        "name": "Lamp",
        "category": "home",
    }


@pytest.mark.parametrize(
    ("sql", "value"),
    [
        (f"SELECT id FROM {TABLE} WHERE id = %(v)s", 2**70),  # past the column's int
        (f"SELECT id FROM {TABLE} WHERE sku = %(v)s", "\udc80"),  # a lone surrogate
        (f"SELECT id FROM {TABLE} WHERE id = %(v)s", "not a number"),
    ],
)
async def test_a_value_the_driver_cannot_send_is_unsendable(
    db: Upstream, sql: str, value: Any
) -> None:
    with pytest.raises(Unsendable):
        await db.call(call(sql, {"v": value}))
    assert db.pool_stats()["in_use"] == 0


@pytest.mark.parametrize("bug", [AttributeError("x"), KeyError("x"), RuntimeError("x")])
def test_map_errors_lets_bugs_through(bug: Exception) -> None:
    with pytest.raises(type(bug)), map_errors("catalog"):
        raise bug


async def test_ping_answers_and_pool_stats_count_connections(pg_dsn: str) -> None:
    async with started(pg_dsn, pool_min=2, pool_max=5) as db:
        await db.ping()
        assert db.pool_stats() == {"size": 2, "in_use": 0, "free": 2, "max": 5}


async def test_an_unreachable_server_is_unavailable_with_connect_set() -> None:
    dsn = f"postgresql://root@127.0.0.1:{free_port()}/nothing"
    async with started(dsn) as db:  # starting does not need the database to be up
        with pytest.raises(SourceUnavailable) as info:
            async with asyncio.timeout(5):
                await db.call(call("SELECT 1 AS one", one=True))
        assert info.value.connect
        with pytest.raises(SourceUnavailable):
            await db.ping()
        assert db.pool_stats()["size"] == 0


async def test_a_missing_database_is_unavailable_with_connect_set(pg_dsn: str) -> None:
    dsn = pg_dsn.rsplit("/", 1)[0] + f"/missing_{uuid.uuid4().hex[:8]}"
    async with started(dsn) as db:
        with pytest.raises(SourceUnavailable) as info:
            await db.call(call("SELECT 1 AS one", one=True))
        assert info.value.connect


async def test_the_server_stops_a_query_at_its_budget_and_the_connection_is_reused(
    pg_dsn: str,
) -> None:
    async with started(pg_dsn, pool_min=1, pool_max=1) as db:
        with pytest.raises(SourceTimeout):
            async with asyncio.timeout(3):  # later than the server's limit: the server answers
                await db.call(call("SELECT pg_sleep(5) AS budget_marker", timeout=0.2))
        assert await _running(pg_dsn, "budget_marker") == 0
        assert await db.call(call("SELECT %(n)s::int AS one", {"n": 1}, one=True)) == {"one": 1}
        assert db.pool_stats() == {"size": 1, "in_use": 0, "free": 1, "max": 1}


async def test_the_budget_counts_down_to_the_deadline(pg_dsn: str) -> None:
    async with started(pg_dsn) as db:
        slow = call("SELECT pg_sleep(5) AS s", timeout=5.0)
        soon = Call(**{**_fields(slow), "deadline": asyncio.get_running_loop().time() + 0.2})
        with pytest.raises(SourceTimeout):
            async with asyncio.timeout(3):
                await db.call(soon)


def _fields(c: Call) -> dict[str, Any]:
    return {f: getattr(c, f) for f in Call.__dataclass_fields__}


async def test_a_query_cancelled_mid_flight_is_cancelled_on_the_server_and_the_pool_answers(
    pg_dsn: str,
) -> None:
    async with started(pg_dsn, pool_min=1, pool_max=2) as db:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await db.call(call("SELECT -1 AS id, pg_sleep(5) AS cancel_marker"))
        assert await _until_none_running(pg_dsn, "cancel_marker") == 0
        assert db.pool_stats()["in_use"] == 0

        async def own(i: int) -> Any:
            sql = "SELECT %(id)s::int AS id, %(sku)s::text AS sku, pg_sleep(0.01)::text AS s"
            return await db.call(call(sql, {"id": i, "sku": f"SKU-{i}"}, one=True))

        async with asyncio.timeout(20):
            rows = await asyncio.gather(*(own(i) for i in range(30)))
        assert rows == [{"id": i, "sku": f"SKU-{i}", "s": ""} for i in range(30)]
        stats = db.pool_stats()
        assert stats["in_use"] == 0
        assert 1 <= stats["size"] <= 2


async def test_a_source_opened_through_the_table_serves_a_config_call(pg_dsn: str) -> None:
    text = f"""
sources:
  catalog: {{kind: sql, dsn: "{pg_dsn}", timeout_ms: 500, pool: {{min: 1, max: 2}}}}
endpoints:
  - path: /products/{{id:int}}
    calls:
      product: {{source: catalog, query: "{BY_ID}", one: true, required: true}}
"""
    loaded = config.loads(text, "t.yaml", {})
    plan = build_plans(loaded.config)[0]
    source = compile_source("catalog", loaded.config.sources["catalog"])
    upstream = await open_upstream("catalog", source)
    try:
        target, params = plan.calls[0].render({"id": 3})
        row = await upstream.call(
            Call("catalog", "product", target, params, 0.5, float("inf"), one=True)
        )
        assert row == {"id": 3, "sku": "SKU-3", "name": "Pen", "category": "office"}
    finally:
        await upstream.close()


async def test_only_a_trace_this_gateway_exports_comments_the_query(db: Upstream) -> None:
    # asyncpg caches statements by text: a comment per call costs a prepare each, so a client's
    # own `sampled` flag (…-01) must not decide it; the gateway's export does.
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    base = call("SELECT current_query() AS q", one=True)
    for exported in (False, True):
        got = await db.call(dataclasses.replace(base, trace=parent, exported=exported))
        commented = got["q"].startswith(f"/* traceparent='{parent}' */")
        assert commented is exported, got
