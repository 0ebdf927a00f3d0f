"""Shared fixtures: a throwaway MariaDB database, a Redis key prefix per test, and throwaway
redis-servers (single ones the tests stop and restart, and a 3-node Cluster).

The servers are real. `scripts/test` starts them when they are not running; when they cannot be
reached here, the fixtures fail with what to do, never skip.

Where test code comes from: tests import the packages and their own support modules
(tests/support.py: the port finder, the throwaway MariaDB, the source fakes `ok`, `slow`,
`failing`, `exploding`; tests/serving.py, config_files.py, redis_servers.py, payloads.py). The
fake upstream HTTP server is `gateway.demo.simulator` (the demo ships it). Tests never import
`bench` or `reliability`: test_bench_smoke.py and test_reliability.py run them as programs, which is
testing them; what a test shares with them lives here, and they may import it from here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pymysql
import pytest
import redis

from gateway.core.types import Upstream
from gateway.demo.simulator import Simulators, UpstreamServer, start_simulators
from tests import redis_servers
from tests.support import Client, Start
from upstreams.http import HttpSettings, http_source

MYSQL_HOST = os.environ.get("GATEWAY_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("GATEWAY_TEST_MYSQL_PORT", "3306"))
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

_HOW = (
    "run the tests with `bash scripts/test`, which starts MariaDB and Redis when they are "
    "installed; to install them: apt-get update && apt-get install -y mariadb-server redis-server"
)


def _mysql_admin() -> pymysql.connections.Connection:
    try:
        return pymysql.connect(
            host=MYSQL_HOST,
            port=MYSQL_PORT,
            user="root",
            password="",
            autocommit=True,
            connect_timeout=5,
        )
    except pymysql.err.OperationalError as exc:
        pytest.fail(
            f"MariaDB is not reachable at {MYSQL_HOST}:{MYSQL_PORT} ({exc}); {_HOW}", pytrace=False
        )


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A fresh, empty MariaDB database for this test session, dropped at the end."""
    name = f"gwtest_{uuid.uuid4().hex[:10]}"
    admin = _mysql_admin()
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of the real Redis; tests keep to their own key prefix (`redis_prefix`)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); {_HOW}", pytrace=False)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix owned by one test; its keys are deleted afterwards."""
    prefix = f"gwtest:{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def throwaway(tmp_path: Path) -> Iterator[Callable[[int], subprocess.Popen[bytes]]]:
    """Start redis-servers on given loopback ports; every one is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        procs.append(redis_servers.start(port, tmp_path))
        return procs[-1]

    yield start
    for proc in procs:
        redis_servers.stop(proc)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-node Redis Cluster (masters only) on free loopback ports, torn down afterwards."""
    # Redis's own node timeout (15 s): these tests never kill a node, so none may be failed over.
    cluster = redis_servers.Cluster(tmp_path_factory.mktemp("cluster"), node_timeout_ms=15000)
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.stop()


PRODUCTS = 500
"""How many products `catalog_dsn` seeds (ids 1..500)."""


@pytest.fixture(scope="session")
def catalog_dsn(mysql_url: str) -> str:
    """The test database, seeded with the products table."""
    from gateway.demo.catalog import seed_mysql

    asyncio.run(seed_mysql(mysql_url, PRODUCTS))
    return mysql_url


@pytest.fixture
async def sims() -> AsyncIterator[Simulators]:
    """The four simulated upstream services on loopback ports, with their request counters."""
    s = await start_simulators()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def product_env(sims: Simulators, catalog_dsn: str, redis_url: str) -> dict[str, str]:
    """The environment that points the shipped gateway.yaml at the simulators, the seeded
    catalog and the real Redis."""
    from tests.config_files import server_env

    return server_env(sims, catalog_dsn, redis_url, admin_token=None)


@pytest.fixture
def served_env(
    monkeypatch: pytest.MonkeyPatch, sims: Simulators, catalog_dsn: str, redis_url: str
) -> Callable[..., dict[str, str]]:
    """Return `put(admin_token, **extra)`: it sets, for this test, the environment that points
    the shipped gateway.yaml at the simulators, the seeded catalog and the real Redis, as a
    gateway served in-process (and its reloads) reads it, and returns it."""
    from tests.config_files import set_server_env

    def put(admin_token: str | None = "admin-token-for-the-tests", **extra: str) -> dict[str, str]:
        return set_server_env(monkeypatch, sims, catalog_dsn, redis_url, admin_token, **extra)

    return put


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with no connection limit: a burst of N is N requests in flight."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


POSTGRES_HOST = os.environ.get("GATEWAY_TEST_POSTGRES_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("GATEWAY_TEST_POSTGRES_PORT", "5432"))


async def _postgres_admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(
            host=POSTGRES_HOST, port=POSTGRES_PORT, user="root", database="postgres", timeout=5
        )
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_HOST}:{POSTGRES_PORT} as root ({exc}); run "
            "the tests with `bash scripts/test`, which starts one when it is installed; to "
            "install it: apt-get update && apt-get install -y postgresql",
            pytrace=False,
        )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session, dropped at the end."""
    name = f"gwtest_{uuid.uuid4().hex[:10]}"
    asyncio.run(_postgres_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://root@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["aiohttp", "httpx"])
def client(request: pytest.FixtureRequest) -> Client:
    """Each HTTP client an http source can use, in turn."""
    name: Client = request.param
    return name


@pytest.fixture
async def server() -> AsyncIterator[UpstreamServer]:
    """A scripted loopback upstream that records what it receives."""
    async with UpstreamServer() as s:
        yield s


@pytest.fixture
async def start(client: Client) -> AsyncIterator[Start]:
    """Start HTTP sources with the parametrized client; close them all afterwards."""
    started: list[Upstream] = []

    async def _start(base_url: str, **fields: Any) -> Upstream:
        if "headers" in fields:
            fields["headers"] = tuple(fields["headers"].items())
        cfg = HttpSettings(base_url=base_url, client=client, **fields)
        upstream = await http_source("test", cfg)
        started.append(upstream)
        return upstream

    yield _start
    for upstream in started:
        await upstream.close()
