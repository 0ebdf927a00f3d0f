"""Shared fixtures: a throwaway MariaDB database, a Redis key prefix per test, and throwaway
redis-servers (single ones the tests stop and restart, and a 3-node Cluster).

The servers are real. `scripts/test` starts them when they are not running; when they cannot be
reached here, the fixtures fail with what to do, never skip.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pymysql
import pytest
import redis

from gateway.simulator import Simulators, start_simulators
from tests import redis_servers

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
    workdir = tmp_path_factory.mktemp("cluster")
    ports: list[int] = []
    while len(ports) < 3:
        port = redis_servers.free_port()
        if port not in ports:
            ports.append(port)
    procs = [
        redis_servers.start(
            p, workdir, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf"
        )
        for p in ports
    ]
    try:
        made = subprocess.run(
            [
                redis_servers.binary("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=30,
        )
        if made.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {made.stdout!r} {made.stderr!r}")
        deadline = time.monotonic() + 15
        for port in ports:
            client = redis.Redis(port=port)
            try:
                while client.cluster("INFO").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        pytest.fail("the throwaway cluster did not reach cluster_state:ok in 15 s")
                    time.sleep(0.1)
            finally:
                client.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            redis_servers.stop(proc)


PRODUCTS = 500
"""How many products `catalog_dsn` seeds (ids 1..500)."""


@pytest.fixture(scope="session")
def catalog_dsn(mysql_url: str) -> str:
    """The test database, seeded with the products table."""
    from gateway.catalog import seed_mysql

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
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with no connection limit: a burst of N is N requests in flight."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session
