"""Why a call failed, in a few stable words, in the access line and in `/admin/sources`: each
failure kind of each adapter, against real loopback servers, MariaDB, PostgreSQL and SQLite, and
never a secret in it (a query value, a header, a SQL parameter, a DSN password)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.app import create_app
from gateway.config import loader as config
from gateway.core.errors import SourceError, reason_of
from gateway.core.types import Call
from gateway.demo.simulator import UpstreamServer, hang, json_body, raw, slow, truncated
from gateway.ops import log
from tests.config_files import config_text, write_config
from tests.serving import serving, serving_config
from tests.support import Client, free_port
from upstreams.http import HttpSettings, http_source
from upstreams.mysql import mysql_source
from upstreams.postgresql import postgresql_source
from upstreams.sql import SqlSettings

TOKEN = "admin-token-for-reason-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRETS = {
    "API_TOKEN": "hdr-s3cret-Kx81",  # a source header's value
    "API_KEY": "qry-s3cret-Vn27",  # a call's query value
    "SQL_SECRET": "sqlparam-s3cret-Tq55",  # a SQL parameter's value
    "DB_PASSWORD": "dsnpass-s3cret-Wz63",  # a DSN's password
}
PRODUCTS = 500
"""How many products the `catalog_dsn` fixture seeds (ids 1..500)."""
HEADERS = 'headers: {Authorization: "Bearer ${API_TOKEN}"}'


@asynccontextmanager
async def junk_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback server that answers anything with a status line no HTTP client accepts; yields
    its URL and the raw requests it received."""
    received: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(4096))
        writer.write(b"HTTP/1.1 2x0 Whatever\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", received
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def gateway(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """Serve the gateway for config `text` (secrets from `SECRETS`) with the admin API on."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    loaded = config.loads(text, "gateway.yaml", SECRETS)
    async with serving_config(loaded) as url, aiohttp.ClientSession() as http:
        yield url, http


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.get(url, **kwargs) as resp:
        return resp.status, orjson.loads(await resp.read())


def logged(capfd: pytest.CaptureFixture[str]) -> str:
    """Return every log line written so far, as the process wrote them."""
    log.flush()
    out, err = capfd.readouterr()
    return out + err


def access_lines(text: str) -> list[dict[str, Any]]:
    """Return the access lines of the fan-outs in `text` (the JSON log)."""
    events = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == "request" and e.get("calls")]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for name, secret in SECRETS.items():
            at = text.find(secret)
            assert at < 0, f"{name} leaked: ...{text[max(0, at - 200) : at + 40]}"


async def test_each_http_failure_has_its_reason_in_the_access_line_and_admin_sources(
    client: Client, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    dead = free_port()
    async with UpstreamServer() as up, junk_server() as (junk, junk_seen):
        up.route("/503", json_body({"error": "down"}, 503))
        up.route("/404", json_body({"error": "no such thing"}, 404))
        up.route("/html", raw(b"<html>maintenance</html>"))
        up.route("/big", json_body(list(range(1000))))
        up.route("/cut", truncated())
        up.route("/hang", hang())
        up.route("/slow", slow(0.3, json_body({"ok": True})))
        common = f"client: {client}, timeout_ms: 2000, {HEADERS}"
        text = f"""
version: 1
cache: {{url: "memory://"}}
sources:
  down:     {{kind: http, base_url: "{up.url}", {common}}}
  gone:     {{kind: http, base_url: "{up.url}", {common}}}
  html:     {{kind: http, base_url: "{up.url}", {common}}}
  big:      {{kind: http, base_url: "{up.url}", max_bytes: 100, {common}}}
  cut:      {{kind: http, base_url: "{up.url}", {common}}}
  hung:     {{kind: http, base_url: "{up.url}", client: {client}, timeout_ms: 200, {HEADERS}}}
  refused:  {{kind: http, base_url: "http://127.0.0.1:{dead}", {common}}}
  junk:     {{kind: http, base_url: "{junk}", {common}}}
  busy:     {{kind: http, base_url: "{up.url}", max_in_flight: 1, {common}}}
  flaky:    {{kind: http, base_url: "{up.url}", {common},
             breaker: {{failure_ratio: 0.5, min_calls: 2, open_ms: 60000}}}}
endpoints:
  - path: /fail
    deadline_ms: 5000
    calls:
      down:    {{source: down, path: /503, query: {{key: "${{API_KEY}}"}}}}
      gone:    {{source: gone, path: /404, query: {{key: "${{API_KEY}}"}}}}
      html:    {{source: html, path: /html, query: {{key: "${{API_KEY}}"}}}}
      big:     {{source: big, path: /big, query: {{key: "${{API_KEY}}"}}}}
      cut:     {{source: cut, path: /cut, query: {{key: "${{API_KEY}}"}}}}
      hung:    {{source: hung, path: /hang, query: {{key: "${{API_KEY}}"}}}}
      refused: {{source: refused, path: /x, query: {{key: "${{API_KEY}}"}}}}
      junk:    {{source: junk, path: /x, query: {{key: "${{API_KEY}}"}}}}
      busy1:   {{source: busy, path: /slow, query: {{key: "${{API_KEY}}"}}}}
      busy2:   {{source: busy, path: /slow, query: {{key: "${{API_KEY}}"}}}}
      flaky:   {{source: flaky, path: /503, query: {{key: "${{API_KEY}}"}}}}
"""
        expected = {
            "down": ("error", "HTTP 503"),
            "gone": ("not_found", "HTTP 404"),
            "html": ("error", "not JSON"),
            "big": ("error", "over max_bytes"),
            "cut": ("error", "incomplete body"),
            "hung": ("timeout", "timeout"),
            "refused": ("error", "connect refused"),
            "junk": ("error", "invalid HTTP response" if client == "aiohttp" else "protocol error"),
        }
        async with gateway(text, monkeypatch) as (url, http):
            answers = [await get(http, f"{url}/fail") for _ in range(3)]
            status, sources = await get(http, f"{url}/admin/sources", headers=AUTH)
    assert [s for s, _ in answers] == [200, 200, 200]  # every call optional: a partial answer
    assert status == 200
    logs = logged(capfd)
    # The secrets did go out (so they could have come back), and came back nowhere.
    assert any(SECRETS["API_KEY"].encode() in r for r in junk_seen)
    assert any(SECRETS["API_TOKEN"] in s.headers.get("Authorization", "") for s in up.seen)
    assert_no_secret(logs, orjson.dumps(sources).decode())
    lines = access_lines(logs)
    assert len(lines) == 3
    for line in lines:
        calls = line["calls"]
        for name, (outcome, reason) in expected.items():
            assert calls[name]["outcome"] == outcome, (name, calls[name])
            assert calls[name]["reason"] == reason, (name, calls[name])
        # Two calls at once of a source that takes one at a time: the other fails fast.
        busy = sorted((calls["busy1"], calls["busy2"]), key=lambda c: c["outcome"])
        assert [c["outcome"] for c in busy] == ["ok", "overloaded"]
        assert busy[1]["reason"] == "over max_in_flight" and "reason" not in busy[0]
    # The breaker opens after two failures in two calls: the third is refused without a try.
    assert [line["calls"]["flaky"]["reason"] for line in lines] == [
        "HTTP 503",
        "HTTP 503",
        "circuit open",
    ]
    report = sources["sources"]
    for name, (_, reason) in expected.items():
        assert report[name]["reasons"] == [{"reason": reason, "count": 3}], name
    assert report["busy"]["reasons"] == [{"reason": "over max_in_flight", "count": 3}]
    assert report["flaky"]["reasons"] == [
        {"reason": "HTTP 503", "count": 2},
        {"reason": "circuit open", "count": 1},
    ]


@pytest.fixture
def sqlite_dsn(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'reasons.db'}"


async def test_each_sql_failure_has_its_reason_and_no_parameter_or_password_in_it(
    mysql_url: str,
    postgres_url: str,
    sqlite_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    dead = free_port()
    my_host = mysql_url.split("@", 1)[1].split("/", 1)[0]
    pg_host = postgres_url.split("@", 1)[1].split("/", 1)[0]
    arg = 'args: {v: "${SQL_SECRET}"}'
    text = f"""
version: 1
cache: {{url: "memory://"}}
sources:
  my:       {{kind: sql, dsn: "{mysql_url}", timeout_ms: 3000}}
  mydenied: {{kind: sql, dsn: "mysql://gw_nobody:${{DB_PASSWORD}}@{my_host}/x", timeout_ms: 3000}}
  mydown:   {{kind: sql, dsn: "mysql://root:${{DB_PASSWORD}}@127.0.0.1:{dead}/x", timeout_ms: 3000}}
  pg:       {{kind: sql, dsn: "{postgres_url}", timeout_ms: 3000}}
  pgdenied: {{kind: sql, dsn: "postgresql://gw_nobody:${{DB_PASSWORD}}@{pg_host}/x",
             timeout_ms: 3000}}
  lite:     {{kind: sql, dsn: "{sqlite_dsn}", timeout_ms: 3000}}
endpoints:
  - path: /fail
    deadline_ms: 8000
    calls:
      mytable:  {{source: my, query: "SELECT a FROM no_such_table WHERE a = %(v)s", {arg}}}
      mysyntax: {{source: my, query: "SELECT 1 FROM DUAL WHERE = %(v)s", {arg}}}
      myrow:    {{source: my, query: "SELECT 1 AS n FROM DUAL WHERE %(v)s = 'x'", one: true,
                 {arg}}}
      mydenied: {{source: mydenied, query: "SELECT 1"}}
      mydown:   {{source: mydown, query: "SELECT 1"}}
      pgvalue:  {{source: pg, query: "SELECT %(v)s::int AS n", {arg}}}
      pgtable:  {{source: pg, query: "SELECT a FROM no_such_table WHERE a = %(v)s", {arg}}}
      pgdenied: {{source: pgdenied, query: "SELECT 1"}}
      litetable: {{source: lite, query: "SELECT a FROM no_such_table WHERE a = %(v)s", {arg}}}
"""
    expected = {
        "mytable": ("error", "no such table (MySQL 1146)"),
        "mysyntax": ("error", "SQL syntax error (MySQL 1064)"),
        "myrow": ("not_found", "no row"),
        "mydenied": ("error", "access denied (MySQL 1045)"),
        "mydown": ("error", "connect refused"),
        "pgvalue": ("error", "value cannot be sent"),
        "pgtable": ("error", "no such table (PostgreSQL 42P01)"),
        "pgdenied": ("error", "access denied (PostgreSQL 28000)"),
        "litetable": ("error", "no such table (SQLite)"),
    }
    async with gateway(text, monkeypatch) as (url, http):
        status, _ = await get(http, f"{url}/fail")
        sources_status, sources = await get(http, f"{url}/admin/sources", headers=AUTH)
    assert status == 200 and sources_status == 200
    logs = logged(capfd)
    assert_no_secret(logs, orjson.dumps(sources).decode())
    (line,) = access_lines(logs)
    for name, (outcome, reason) in expected.items():
        got = line["calls"][name]
        assert (got["outcome"], got.get("reason")) == (outcome, reason), (name, got)
    report = sources["sources"]
    assert report["my"]["reasons"] == [
        {"reason": "SQL syntax error (MySQL 1064)", "count": 1},
        {"reason": "no row", "count": 1},
        {"reason": "no such table (MySQL 1146)", "count": 1},
    ]
    assert report["pg"]["reasons"] == [
        {"reason": "no such table (PostgreSQL 42P01)", "count": 1},
        {"reason": "value cannot be sent", "count": 1},
    ]
    assert report["mydown"]["reasons"] == [{"reason": "connect refused", "count": 1}]
    assert report["lite"]["reasons"] == [{"reason": "no such table (SQLite)", "count": 1}]


def call(target: str, params: dict[str, Any], timeout_s: float = 2.0) -> Call:
    deadline = asyncio.get_running_loop().time() + timeout_s
    return Call("s", "c", target, params, timeout_s, deadline, False, "rid", {}, 1000)


async def failure(source: Callable[[Call], Any], c: Call) -> SourceError:
    with pytest.raises(SourceError) as caught:
        await source(c)
    return caught.value


async def test_driver_messages_quote_what_reasons_never_do(
    mysql_url: str, postgres_url: str
) -> None:
    """The other tests could pass by luck if no driver ever quoted a secret: these do."""
    secret = SECRETS["SQL_SECRET"]
    async with junk_server() as (junk, _):
        upstream = await http_source("s", HttpSettings(base_url=junk))
        try:
            exc = await failure(upstream.call, call("/x", {"key": secret}))
        finally:
            await upstream.close()
    assert f"key={secret}" in str(exc)  # aiohttp's error holds the whole URL
    assert reason_of(exc) == "invalid HTTP response"

    pg = await postgresql_source("s", SqlSettings(postgres_url))
    try:
        exc = await failure(pg.call, call("SELECT $1::int AS n", {"v": secret}))
    finally:
        await pg.close()
    assert secret in str(exc)
    assert reason_of(exc) == "value cannot be sent"

    my = await mysql_source("s", SqlSettings(mysql_url))
    try:
        exc = await failure(my.call, call("SELECT 1 FROM DUAL WHERE = %(v)s", {"v": secret}))
    finally:
        await my.close()
    assert secret in str(exc)
    assert reason_of(exc) == "SQL syntax error (MySQL 1064)"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("SELECT SLEEP(3) AS s", "statement timeout"),  # MariaDB's max_statement_time
        ("SELECT * FROM no_such_table", "no such table (MySQL 1146)"),
    ],
)
async def test_the_database_stopping_a_query_is_a_statement_timeout(
    mysql_url: str, query: str, reason: str
) -> None:
    # Through the adapter alone: in the gateway the call's own timeout, set to the same budget,
    # races the server's and may answer first (`timeout`).
    my = await mysql_source("s", SqlSettings(mysql_url))
    try:
        async with asyncio.timeout(2.0):  # later than the server's limit: the server answers
            exc = await failure(my.call, call(query, {}, timeout_s=0.2))
    finally:
        await my.close()
    assert reason_of(exc) == reason


async def test_postgresql_stopping_a_query_is_a_statement_timeout(postgres_url: str) -> None:
    pg = await postgresql_source("s", SqlSettings(postgres_url))
    try:
        async with asyncio.timeout(2.0):
            exc = await failure(pg.call, call("SELECT pg_sleep(3)", {}, timeout_s=0.2))
    finally:
        await pg.close()
    assert reason_of(exc) == "statement timeout"


async def test_an_id_missing_from_a_batch_answer_has_its_reason_in_admin_sources(
    served_env: Callable[..., dict[str, str]], redis_prefix: str, tmp_path: Path
) -> None:
    served_env(TOKEN)
    path = write_config(tmp_path, config_text(redis_prefix))
    async with serving(create_app(str(path))) as url, aiohttp.ClientSession() as http:
        status, listing = await get(http, f"{url}/products?ids=1,{PRODUCTS + 7},2")
        _, sources = await get(http, f"{url}/admin/sources", headers=AUTH)
    assert status == 200, listing
    catalog = sources["sources"]["catalog"]
    assert catalog["reasons"] == [{"reason": "not in the batch answer", "count": 1}]
