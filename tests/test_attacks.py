"""Hostile input against the real app: URL template escapes, SQL injection, leaked secrets,
oversized requests and forwarded client headers, seen from the upstream's side of the wire."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote

import aiohttp
import orjson
import pymysql
import pytest
import yarl

from gateway.config import loader as config
from gateway.demo.catalog import seed_mysql
from gateway.demo.simulator import UpstreamServer, json_body, raw, start_simulators
from tests.config_files import gateway_process, server_env, write_config
from tests.serving import serving_config
from tests.support import free_port

SHIPPED = (Path(__file__).resolve().parent.parent / "gateway.yaml").read_text()
SECRET = "s3cr3t-upstream-token-5f1d"
DB_SECRET = "s3cr3t-db-password-9a2e"
ADMIN_TOKEN = "attack-admin-token"

ATTACK_YAML = """\
version: 1
cache: {url: "memory://"}
sources:
  db: {kind: sql, dsn: "${CATALOG_DSN}", timeout_ms: 2000}
  up:
    kind: http
    base_url: "${UP_URL}"
    timeout_ms: 2000
    headers: {Authorization: "Bearer ${UP_TOKEN}"}
  upx: {kind: http, client: httpx, base_url: "${UP_URL}", timeout_ms: 2000}
endpoints:
  - path: /items/{sku:str}
    deadline_ms: 4000
    calls:
      row:
        source: db
        query: "SELECT id, sku, name FROM products WHERE sku = %(sku)s"
        one: true
        fallback: null
      item: {source: up, path: "/items/{sku}/detail", query: {q: "{sku}"}, fallback: null}
      itemx: {source: upx, path: "/itemsx/{sku}/detail", query: {q: "{sku}"}, fallback: null}
      next: {source: up, path: "/next/{item.next}/end", fallback: null}
  - path: /products/{id:int}
    deadline_ms: 4000
    calls:
      p: {source: up, path: "/products/{id}", fallback: null}
"""

# What an upstream answers for `item`: the next call puts it in its path (a second-order attack).
EVIL_NEXT = "../../admin/x?y=1#z"

ESCAPES = [
    "..",
    ".",
    "../admin",
    "..%2Fadmin",
    "%2e%2e",
    "%252e%252e%252f",
    "%2F",
    "%2f..%2f",
    "@evil.example",
    "user:pass@evil.example",
    "http://evil.example",
    "//evil.example",
    "\\\\evil.example\\x",
    "a\r\nX-Injected: 1",
    "a\nHost: evil.example",
    "a%0d%0aX-Injected:%201",
    "?admin=1",
    "#frag",
    "a&q=b",
    "a=b;c",
    "..;",
    "%00",
    "a\x00b",
    " spaced out ",
    "ünïcødé-日本",
    "+plus+",
    "{id}",
    "${UP_TOKEN}",
]

SQL_INJECTIONS = [
    "' OR '1'='1",
    "SKU-1' --",
    "SKU-1'; DROP TABLE products; --",
    "1 OR 1=1",
    "\\' OR 1=1 #",
    "%' OR sku LIKE '%",
    "SKU-1\x00' OR '1'='1",
    "') UNION SELECT 1, @@version, user() -- ",
    "SKU-1' AND SLEEP(3) AND '1'='1",
]


@pytest.fixture(scope="session")
def catalog_dsn(mysql_url: str) -> str:
    """The test database, seeded with the products table."""
    asyncio.run(seed_mysql(mysql_url, 200))
    return mysql_url


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        server.route("/items/", json_body({"next": EVIL_NEXT}))
        server.route("/itemsx/", json_body({"ok": True}))
        server.route("/next/", json_body({"ok": True}))
        server.route("/products/", json_body({"ok": True}))
        server.route("/boom/", raw(b"upstream failed", status=500))
        yield server


def attack_env(catalog_dsn: str, upstream: UpstreamServer) -> dict[str, str]:
    return {"CATALOG_DSN": catalog_dsn, "UP_URL": upstream.url, "UP_TOKEN": SECRET}


@pytest.fixture
async def gateway(catalog_dsn: str, upstream: UpstreamServer) -> AsyncIterator[str]:
    loaded = config.loads(ATTACK_YAML, "attack.yaml", attack_env(catalog_dsn, upstream))
    async with serving_config(loaded) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_raw(
    http: aiohttp.ClientSession, base: str, target: str, **headers: str
) -> tuple[int, bytes]:
    """GET `target` sent exactly as given (already percent-encoded, never normalized)."""
    async with http.get(yarl.URL(base + target, encoded=True), headers=headers) as resp:
        return resp.status, await resp.read()


def host_of(server: UpstreamServer) -> str:
    return server.url.removeprefix("http://")


@pytest.mark.parametrize("encode", [True, False], ids=["encoded", "as-is"])
async def test_path_values_never_change_the_upstream_host_or_path_shape(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession, encode: bool
) -> None:
    reached = 0
    for payload in ESCAPES:
        if encode:
            target = "/items/" + quote(payload, safe="")
        elif all(33 <= ord(c) < 127 for c in payload) and "#" not in payload:
            target = "/items/" + payload
        else:
            continue  # not sendable raw on an HTTP/1.1 request line
        upstream.seen.clear()
        try:
            status, body = await get_raw(http, gateway, target)
        except aiohttp.ClientError:
            continue  # the client itself would not send it
        if status != 200:
            # Refused at the edge: a decoded `/` matches no route (404), the parser refused it
            # (400), or the value is not valid; either way no upstream saw anything.
            assert status in (400, 404), (payload, status, body)
            assert upstream.seen == [], (payload, upstream.seen)
            continue
        reached += 1
        value = unquote(target.removeprefix("/items/"))
        doc = orjson.loads(body)
        assert {s.path.split("/")[1] for s in upstream.seen} == {"items", "itemsx", "next"}, (
            payload,
            upstream.seen,
        )
        for seen in upstream.seen:
            assert seen.headers["Host"] == host_of(upstream), (payload, seen)
            assert "X-Injected" not in seen.headers and seen.method == "GET"
            segments = seen.path.split("/")
            assert len(segments) == 4, (payload, seen.target)
            if segments[1] == "next":
                assert (unquote(segments[2]), segments[3]) == (EVIL_NEXT, "end")
                assert seen.query == ""
                continue
            assert unquote(segments[2]) == value and segments[3] == "detail", (payload, seen)
            assert parse_qsl(seen.query, keep_blank_values=True) == [("q", value)], (payload, seen)
        assert doc["row"] is None and doc["_meta"]["sources"] == {"row": "not_found"}, doc
    assert reached >= (20 if encode else 10)


async def test_typed_path_parameters_refuse_escapes_before_any_upstream_call(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    for payload in ESCAPES:
        status, _ = await get_raw(http, gateway, "/products/" + quote(payload, safe=""))
        assert status in (404, 422), (payload, status)
    status, _ = await get_raw(http, gateway, "/products/42")
    assert status == 200
    assert [s.target for s in upstream.seen] == ["/products/42"]


async def test_sql_injection_payloads_stay_bound_parameters(
    gateway: str, catalog_dsn: str, http: aiohttp.ClientSession
) -> None:
    count_before = _product_count(catalog_dsn)
    status, body = await get_raw(http, gateway, "/items/SKU-42")
    assert status == 200 and orjson.loads(body)["row"]["sku"] == "SKU-42"
    for payload in SQL_INJECTIONS:
        status, body = await get_raw(http, gateway, "/items/" + quote(payload, safe=""))
        assert status == 200, (payload, body)
        doc = orjson.loads(body)
        # Bound as one value, each payload is a SKU that does not exist: no row, no error.
        assert doc["row"] is None, (payload, doc)
        assert doc["_meta"]["sources"].get("row") == "not_found", (payload, doc)
    assert _product_count(catalog_dsn) == count_before


def _product_count(dsn: str) -> int:
    url = yarl.URL(dsn)
    conn = pymysql.connect(
        host=url.host, port=url.port, user=url.user or "root", database=url.path.lstrip("/")
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM products")
            (count,) = cur.fetchone()
            return int(count)
    finally:
        conn.close()


async def test_client_headers_are_not_forwarded_to_upstreams(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    # gateway.yaml has no header forwarding: only a source's own `headers` reach it. (Issue 7's
    # rule that an endpoint forwarding Authorization or Cookie must key its cache on them has
    # nothing to apply to until forwarding exists.)
    client = {
        "Authorization": "Bearer client-credential",
        "Cookie": "session=client-session",
        "X-Forwarded-For": "10.0.0.1",
        "X-Api-Key": "client-key",
        "Proxy-Authorization": "Basic Y2xpZW50",
    }
    status, _ = await get_raw(http, gateway, "/items/SKU-7", **client)
    assert status == 200
    assert len(upstream.seen) == 3
    for seen in upstream.seen:
        received = {k.lower(): v for k, v in seen.headers.items()}
        for name, value in client.items():
            assert value not in received.values(), (name, seen)
        assert "cookie" not in received and "x-api-key" not in received
        auth = received.get("authorization")
        # `up` sends its configured token; `upx` has no headers configured, so none.
        assert auth in (f"Bearer {SECRET}", None), seen
    assert {s.headers.get("Authorization") for s in upstream.seen} == {f"Bearer {SECRET}", None}


async def test_oversized_requests_are_refused_and_the_gateway_keeps_serving(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    status, _ = await get_raw(http, gateway, "/items/" + "a" * 100_000)
    assert 400 <= status < 500
    status, _ = await get_raw(http, gateway, "/products/" + "1" * 100_000)
    assert 400 <= status < 500
    status, _ = await get_raw(http, gateway, "/products/" + "1" * 5_000)
    assert status == 422  # an int of 5000 digits is not parsed
    for size in (100_000, 1_000_000):
        status, _ = await get_raw(http, gateway, "/products/1", **{"X-Big": "a" * size})
        assert status == 431
    many = {f"X-H{i}": "v" * 100 for i in range(1000)}
    async with http.get(f"{gateway}/products/1", headers=many) as resp:
        assert resp.status == 431
    for path in ("/products/1", "/healthz"):
        async with http.post(f"{gateway}{path}", data=io.BytesIO(b"x" * 5_000_000)) as resp:
            assert resp.status == 413
    assert upstream.seen == []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    async with http.post(f"{gateway}/healthz", data=chunks()) as resp:
        assert resp.status == 413  # streamed, no Content-Length: counted as it arrives
    status, body = await get_raw(http, gateway, "/products/1")
    assert status == 200 and orjson.loads(body)["p"] == {"ok": True}


async def test_an_unauthenticated_admin_body_is_refused_by_size_before_the_token_check(
    catalog_dsn: str,
    upstream: UpstreamServer,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    loaded = config.loads(ATTACK_YAML, "attack.yaml", attack_env(catalog_dsn, upstream))
    async with serving_config(loaded) as url:
        big = b'{"tags": ["' + b"x" * 3_000_000 + b'"]}'
        async with http.post(f"{url}/admin/cache/purge", data=io.BytesIO(big)) as resp:
            assert resp.status == 413
        async with http.post(f"{url}/admin/cache/purge", json={"tags": ["t"]}) as resp:
            assert resp.status == 401
        for token in ("", "wrong", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1]):
            async with http.get(
                f"{url}/admin/config", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 401, token
        async with http.get(
            f"{url}/admin/config", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as resp:
            text = await resp.text()
            assert resp.status == 200
        assert SECRET not in text and "***" in text


async def test_secrets_never_reach_logs_error_bodies_readyz_or_admin_config(
    catalog_dsn: str, upstream: UpstreamServer, tmp_path: Path
) -> None:
    # Served by `gateway serve` in a subprocess, so its logs are the real stderr.
    text = (
        ATTACK_YAML.replace(
            '  upx: {kind: http, client: httpx, base_url: "${UP_URL}", timeout_ms: 2000}\n',
            '  upx: {kind: http, client: httpx, base_url: "${UP_URL}", timeout_ms: 2000}\n'
            '  locked: {kind: sql, dsn: "mysql://gw_nobody:${DB_PASSWORD}@127.0.0.1:3306/x",'
            " timeout_ms: 2000}\n"
            '  dead: {kind: http, base_url: "http://127.0.0.1:${DEAD_PORT}", timeout_ms: 2000,'
            ' headers: {X-Api-Key: "${DEAD_KEY}"}}\n',
        )
        + """\
  - path: /fail/{id:int}
    deadline_ms: 4000
    calls:
      locked: {source: locked, query: "SELECT %(id)s AS id", one: true, required: true}
  - path: /dead/{id:int}
    deadline_ms: 4000
    calls:
      boom: {source: up, path: "/boom/{id}", required: true}
      dead: {source: dead, path: "/x/{id}", fallback: null}
"""
    )
    path = write_config(tmp_path, text)
    env = {
        **attack_env(catalog_dsn, upstream),
        "DB_PASSWORD": DB_SECRET,
        "DEAD_PORT": str(free_port()),
        "DEAD_KEY": SECRET + "-dead",
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logs = tmp_path / "gateway.log"
    bodies = []
    async with (
        gateway_process(path, port, env, logs),
        aiohttp.ClientSession() as http,
    ):
        for target in ("/items/SKU-3", "/fail/1", "/dead/1", "/readyz", "/nope"):
            async with http.get(base + target) as resp:
                bodies.append(await resp.read())
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for target in ("/admin/config", "/admin/sources"):
            async with http.get(base + target, headers=auth) as resp:
                assert resp.status == 200
                bodies.append(await resp.read())
        async with http.post(base + "/admin/reload", headers=auth) as resp:
            bodies.append(await resp.read())
    assert any(s.headers.get("Authorization") == f"Bearer {SECRET}" for s in upstream.seen)
    log_text = logs.read_text()
    assert '"request"' in log_text  # access lines were written
    everything = b"\n".join(bodies).decode() + log_text
    for secret in (SECRET, DB_SECRET, ADMIN_TOKEN):
        assert secret not in everything, secret
    assert "Traceback" not in log_text


def test_gateway_check_never_prints_secrets(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        ATTACK_YAML.replace("timeout_ms: 2000\n    headers", "timeout_ms: soon\n    headers")
        .replace('"${CATALOG_DSN}"', '"mysql://root:${DB_PASSWORD}@127.0.0.1:3306/c?x"')
        .replace('base_url: "${UP_URL}"\n', 'base_url: "ftp://u:${DB_PASSWORD}@${UP_URL}"\n')
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "UP_URL": "127.0.0.1:9",
        "UP_TOKEN": SECRET,
        "DB_PASSWORD": DB_SECRET,
    }
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and "sources.up" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert DB_SECRET not in result.stderr + result.stdout


async def test_simulated_product_view_refuses_escapes_too(
    catalog_dsn: str, http: aiohttp.ClientSession
) -> None:
    # The shipped config: {id:int} paths; nothing but digits ever reaches the services.
    sims = await start_simulators()
    try:
        loaded = config.loads(
            SHIPPED,
            "gateway.yaml",
            server_env(sims, catalog_dsn, "memory://", None),
        )
        async with serving_config(loaded) as url:
            before = sims.counts()
            for payload in ESCAPES:
                status, _ = await get_raw(http, url, "/products/" + quote(payload, safe=""))
                assert status in (404, 422), (payload, status)
            assert sims.counts() == before
    finally:
        await sims.close()
