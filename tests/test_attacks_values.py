"""Hostile values against the real app: request ids, out-of-range and non-finite parameters,
values a database driver cannot bind, header values a client cannot encode, and upstream JSON
nested deeper than the merge can encode. Each is an answer (200 with the call's fallback, or
422), never a 500, and a refused parameter costs no source call.

The app runs under uvicorn with a loopback upstream (gateway/demo/simulator.py), a SQLite file
and the real MariaDB catalog.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from gateway.config import loader as config
from gateway.core.errors import Unsendable
from gateway.core.types import Call
from gateway.demo.catalog import seed_sqlite
from gateway.demo.simulator import UpstreamServer, json_body, raw
from gateway.ops.log import _request_id
from tests.serving import serving_config
from tests.support import scope
from upstreams.http import HttpSettings, http_source

VALUES_YAML = """\
version: 1
cache: {url: "memory://"}
sources:
  lite: {kind: sql, dsn: "${LITE_DSN}", timeout_ms: 3000}
  db: {kind: sql, dsn: "${CATALOG_DSN}", timeout_ms: 3000}
  up: {kind: http, base_url: "${UP_URL}", timeout_ms: 3000}
  upx: {kind: http, client: httpx, base_url: "${UP_URL}", timeout_ms: 3000}
endpoints:
  - path: /ids/{id:int}
    deadline_ms: 5000
    calls:
      lite: {source: lite, query: "SELECT id, sku FROM products WHERE id = %(id)s", one: true}
      db: {source: db, query: "SELECT id, sku FROM products WHERE id = %(id)s", one: true}
      up: {source: up, path: "/a/{id}"}
      upx: {source: upx, path: "/x/{id}"}
  - path: /prices/{amount:float}
    deadline_ms: 5000
    calls:
      lite: {source: lite, query: "SELECT id FROM products WHERE price = %(amount)s"}
      db: {source: db, query: "SELECT id FROM products WHERE price = %(amount)s"}
      up: {source: up, path: "/a/{amount}"}
  - path: /skus/{sku}
    deadline_ms: 5000
    calls:
      lite: {source: lite, query: "SELECT id FROM products WHERE sku = %(sku)s"}
      up: {source: up, path: "/a/{sku}"}
  - path: /chain/{id:int}
    deadline_ms: 5000
    calls:
      n: {source: up, path: "/n/{id}", required: true}
      lite:
        source: lite
        query: "SELECT id FROM products WHERE id = %(v)s"
        args: {v: "{n.v}"}
        fallback: {none: true}
      db:
        source: db
        query: "SELECT id FROM products WHERE id = %(v)s"
        args: {v: "{n.v}"}
        fallback: {none: true}
  - path: /forward/{id:int}
    deadline_ms: 5000
    calls:
      up: {source: up, path: "/a/{id}", forward_headers: [X-Lang], fallback: {none: true}}
      upx: {source: upx, path: "/x/{id}", forward_headers: [X-Lang], fallback: {none: true}}
  - path: /deep/{id:int}
    deadline_ms: 5000
    calls:
      deep: {source: up, path: "/deep/{id}", fallback: {deep: false}}
      deepx: {source: upx, path: "/deep/{id}", fallback: omit}
      fine: {source: up, path: "/a/{id}"}
  - path: /deeper/{id:int}
    deadline_ms: 5000
    calls:
      deep: {source: up, path: "/deep/{id}", required: true}
"""

U64_MAX = 2**64 - 1
"""Decoded by orjson as an int, bound by MariaDB, but beyond what SQLite can bind."""


def nested(depth: int) -> bytes:
    """Return JSON nested `depth` levels: orjson decodes up to 1024, encodes up to 255."""
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.fixture
def lite_dsn(tmp_path: Path) -> str:
    path = tmp_path / "catalog.db"
    seed_sqlite(str(path), 50)
    return f"sqlite:///{path}"


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        server.route("/a/", json_body({"ok": True}))
        server.route("/x/", json_body({"ok": True}))
        server.route("/n/", json_body({"v": U64_MAX}))
        server.route("/deep/", raw(nested(300)))
        yield server


@pytest.fixture
async def gateway(lite_dsn: str, catalog_dsn: str, upstream: UpstreamServer) -> AsyncIterator[str]:
    env = {"LITE_DSN": lite_dsn, "CATALOG_DSN": catalog_dsn, "UP_URL": upstream.url}
    async with serving_config(config.loads(VALUES_YAML, "values.yaml", env)) as url:
        yield url


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    """GET `url`; return the status, the JSON body (or the text of one that is not JSON: a bare
    500 is text), and the headers."""
    async with http.get(url, headers=headers) as resp:
        body = await resp.read()
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = {"not JSON": body.decode(errors="replace")}
        return resp.status, doc, resp.headers


# --- request ids -------------------------------------------------------------------------


VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,128}")

BAD_IDS = [
    "ünïcødé-id",  # sent as UTF-8, read as Latin-1 by the server: not ASCII either way
    "日本",
    "id with spaces",
    "tab\tinside",
    "x" * 129,
]


@pytest.mark.parametrize("sent", BAD_IDS, ids=range(len(BAD_IDS)))
async def test_a_request_id_that_is_not_short_visible_ascii_is_replaced(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession, sent: str
) -> None:
    status, doc, headers = await get(http, f"{gateway}/ids/7", {"X-Request-ID": sent})
    assert status == 200, doc
    assert doc["upx"] == {"ok": True} and doc["up"] == {"ok": True}, doc
    given = headers["X-Request-ID"]
    assert given != sent and VISIBLE_ASCII.fullmatch(given), given
    assert {s.headers["X-Request-ID"] for s in upstream.seen} == {given}


async def test_a_visible_ascii_request_id_is_kept_and_propagated(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    sent = "req-~!#$%&'*+-.^_`|" + "z" * 100
    status, _, headers = await get(http, f"{gateway}/ids/7", {"X-Request-ID": sent})
    assert status == 200 and headers["X-Request-ID"] == sent
    assert [s.headers["X-Request-ID"] for s in upstream.seen] == [sent, sent]


RAW_IDS = [b"", b"del\x7f", b"nul\x00", b"\x80\xff", b"caf\xe9", b"a b", b"x" * 129]


@pytest.mark.parametrize("sent", RAW_IDS, ids=range(len(RAW_IDS)))
def test_request_id_bytes_no_client_library_would_send_are_replaced_too(sent: bytes) -> None:
    given = _request_id({**scope("/"), "headers": [(b"x-request-id", sent)]})
    assert VISIBLE_ASCII.fullmatch(given) and given.encode() != sent, given
    assert _request_id({**scope("/"), "headers": [(b"x-request-id", b"!~" * 64)]}) == "!~" * 64


# --- values a driver or a client cannot take ----------------------------------------------


async def test_a_value_sqlite_cannot_bind_is_that_calls_error_not_a_500(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    # The upstream's u64 feeds both SQL calls: MariaDB binds it (no such row), SQLite cannot.
    status, doc, _ = await get(http, f"{gateway}/chain/3")
    assert status == 200, doc
    assert doc["lite"] == {"none": True} and doc["db"] == []
    assert doc["_meta"] == {"complete": False, "sources": {"lite": "error"}}


async def test_a_forwarded_header_the_httpx_client_cannot_encode_is_that_calls_error(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    status, doc, _ = await get(http, f"{gateway}/forward/3", {"X-Lang": "français"})
    assert status == 200, doc
    assert doc["up"] == {"ok": True} and doc["upx"] == {"none": True}
    assert doc["_meta"]["sources"] == {"upx": "error"}
    status, doc, _ = await get(http, f"{gateway}/forward/3", {"X-Lang": "fr"})
    assert status == 200 and doc["_meta"]["complete"], doc


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
async def test_each_http_client_sends_a_non_ascii_header_or_fails_the_call_cleanly(
    upstream: UpstreamServer, kind: Literal["aiohttp", "httpx"]
) -> None:
    source = await http_source("up", HttpSettings(base_url=upstream.url, client=kind))
    deadline = asyncio.get_running_loop().time() + 5
    try:
        call = Call("up", "c", "/a/1", {}, 5.0, deadline, headers={"X-Lang": "français"})
        try:
            assert await source.call(call) == {"ok": True}
            assert kind == "aiohttp"  # sent as UTF-8
        except Unsendable:
            assert kind == "httpx" and upstream.seen == []  # header values are ASCII only
        assert await source.call(replace(call, headers={"X-Lang": "fr"})) == {"ok": True}
    finally:
        await source.close()


# --- upstream JSON the merge cannot encode --------------------------------------------------


async def test_json_too_deep_to_encode_is_that_calls_error_and_its_fallback_applies(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):  # the second answer comes from the same (uncached) path
        status, doc, headers = await get(http, f"{gateway}/deep/5")
        assert status == 200, doc
        assert doc["deep"] == {"deep": False} and "deepx" not in doc
        assert doc["fine"] == {"ok": True}
        assert doc["_meta"] == {"complete": False, "sources": {"deep": "error", "deepx": "error"}}
        assert headers["X-Gateway-Complete"] == "false"
        assert 'deep;desc="error"' in headers["Server-Timing"]


async def test_json_too_deep_to_encode_in_a_required_call_is_a_502(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    status, doc, _ = await get(http, f"{gateway}/deeper/5")
    assert status == 502, doc
    assert doc["error"]["call"] == "deep" and doc["error"]["outcome"] == "error"


# --- parameters are checked before any I/O -------------------------------------------------

INT_MAX = 2**63 - 1
INT_MIN = -(2**63)

REFUSED = [
    ("/ids/", str(INT_MAX + 1), "id", "less_than_equal"),
    ("/ids/", str(INT_MIN - 1), "id", "greater_than_equal"),
    ("/ids/", str(U64_MAX), "id", "less_than_equal"),
    ("/ids/", "9" * 40, "id", "less_than_equal"),
    ("/prices/", "nan", "amount", "finite_number"),
    ("/prices/", "NaN", "amount", "finite_number"),
    ("/prices/", "inf", "amount", "finite_number"),
    ("/prices/", "-inf", "amount", "finite_number"),
    ("/prices/", "Infinity", "amount", "finite_number"),
    ("/prices/", "1e309", "amount", "finite_number"),
    ("/prices/", "-1e309", "amount", "finite_number"),
    ("/skus/", "s" * 257, "sku", "string_too_long"),
]


@pytest.mark.parametrize(("prefix", "value", "name", "kind"), REFUSED, ids=range(len(REFUSED)))
async def test_out_of_range_and_non_finite_parameters_are_422_before_any_call(
    gateway: str,
    upstream: UpstreamServer,
    http: aiohttp.ClientSession,
    prefix: str,
    value: str,
    name: str,
    kind: str,
) -> None:
    status, doc, _ = await get(http, f"{gateway}{prefix}{value}")
    assert status == 422, doc
    (error,) = doc["detail"]
    assert error["loc"] == ["path", name] and error["type"] == kind and error["input"] == value
    assert upstream.seen == []  # each of these endpoints calls the upstream with every request


ACCEPTED = [
    ("/ids/", str(INT_MAX)),
    ("/ids/", str(INT_MIN)),
    ("/prices/", "1.5e308"),
    ("/prices/", "-0.0"),
    ("/skus/", "s" * 256),
]


@pytest.mark.parametrize(("prefix", "value"), ACCEPTED, ids=range(len(ACCEPTED)))
async def test_parameters_at_their_bounds_reach_every_source(
    gateway: str, upstream: UpstreamServer, http: aiohttp.ClientSession, prefix: str, value: str
) -> None:
    status, doc, _ = await get(http, f"{gateway}{prefix}{value}")
    assert status == 200, doc
    assert set(doc["_meta"]["sources"].values()) <= {"not_found"}, doc
    assert upstream.seen


async def test_the_openapi_document_states_the_parameter_bounds(
    gateway: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway}/openapi.json") as resp:
        paths = (await resp.json())["paths"]

    def schema(path: str) -> dict[str, Any]:
        (param,) = [p for p in paths[path]["get"]["parameters"] if p["in"] == "path"]
        return dict(param["schema"])

    assert schema("/ids/{id}") == {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX}
    assert schema("/skus/{sku}") == {"type": "string", "maxLength": 256}
    assert schema("/prices/{amount}")["type"] == "number"
