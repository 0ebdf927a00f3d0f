"""Operations under attack: secrets written literally in the config, probes an orchestrator
hammers, personal answers marked `public`, docs that need the internet, a demo open to the
network and a guessable admin token. Real app, real MariaDB, real loopback servers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway import cli
from gateway.app import create_app
from gateway.config import loader as config
from gateway.config.redact import redact_text
from gateway.demo.simulator import UpstreamServer, echo, json_body
from gateway.ops.readiness import Readiness
from tests.config_files import start_demo, wait_healthy, write_atomically
from tests.serving import serving
from tests.support import free_port

ADMIN_TOKEN = "ops-attack-admin-token-3b9c"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# Written as they are in the file, no ${VAR}: still secrets.
HEADER_SECRET = "lit-h3ader-key-41ab"
BEARER_SECRET = "lit-b3arer-cred-77f0"
QUERY_SECRET = "lit-qu3ry-key-c2d9"
DSN_SECRET = "lit-dsn-passw0rd-e5a1"
REDIS_SECRET = "lit-redis-passw0rd-90fe"
URL_SECRET = "lit-url-passw0rd-1d7b"
LITERALS = (HEADER_SECRET, BEARER_SECRET, QUERY_SECRET, DSN_SECRET, REDIS_SECRET)

LITERAL_YAML = """\
version: 1
cache: {{url: "memory://"}}
sources:
  db: {{kind: sql, dsn: "{catalog}", timeout_ms: 2000}}
  locked: {{kind: sql, dsn: "mysql://gw_nobody:{dsn_secret}@127.0.0.1:3306/x", timeout_ms: 2000}}
  up:
    kind: http
    base_url: "{up}"
    timeout_ms: 2000
    headers: {{X-Api-Key: "{header_secret}", Authorization: "Bearer {bearer_secret}"}}
endpoints:
  - path: /products/{{id:int}}
    deadline_ms: 4000
    calls:
      product:
        source: db
        query: "SELECT id, sku, name, category FROM products WHERE id = %(id)s"
        one: true
        required: true
      recs:
        source: up
        path: /recs/{{id}}
        query: {{api_key: "{query_secret}", category: "{{product.category}}"}}
        fallback: null
"""


def literal_yaml(catalog: str, up: str) -> str:
    return LITERAL_YAML.format(
        catalog=catalog,
        up=up,
        dsn_secret=DSN_SECRET,
        header_secret=HEADER_SECRET,
        bearer_secret=BEARER_SECRET,
        query_secret=QUERY_SECRET,
    )


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        server.route("/", json_body({}))
        server.route("/recs/", echo())
        yield server


def assert_no_literal(text: str) -> None:
    for secret in LITERALS:
        assert secret not in text, secret


# --- item 8 (a): literal secrets ---------------------------------------------------------------


def test_redacted_config_hides_literal_headers_query_values_and_every_dsn_password() -> None:
    text = literal_yaml("mysql://root@127.0.0.1:3306/c", f"http://svc:{URL_SECRET}@127.0.0.1:9")
    text = text.replace('url: "memory://"', f'url: "redis://:{REDIS_SECRET}@127.0.0.1:6379/0"')
    loaded = config.loads(text, "gateway.yaml", {})
    shown = loaded.redacted()
    assert_no_literal(orjson.dumps(shown).decode())
    assert URL_SECRET not in orjson.dumps(shown).decode()
    assert shown["sources"]["up"]["base_url"] == "http://svc:***@127.0.0.1:9"
    up = shown["sources"]["up"]
    assert up["headers"] == {"X-Api-Key": "***", "Authorization": "Bearer ***"}
    query = shown["endpoints"][0]["calls"]["recs"]["query"]
    # A pure template names a value, it holds none: operators still see where it comes from.
    assert query == {"api_key": "***", "category": "{product.category}"}
    assert shown["sources"]["locked"]["dsn"] == "mysql://gw_nobody:***@127.0.0.1:3306/x"
    assert shown["cache"]["url"] == "redis://:***@127.0.0.1:6379/0"
    # Free text (a driver's error, a log line) loses them too, wherever they appear.
    said = f"failed with {DSN_SECRET} and {QUERY_SECRET}, sent {HEADER_SECRET} / {BEARER_SECRET}"
    assert_no_literal(redact_text(said, loaded.secrets))


async def test_admin_config_check_and_a_refused_reload_never_show_literal_secrets(
    catalog_dsn: str,
    upstream: UpstreamServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    path = tmp_path / "gateway.yaml"
    good = literal_yaml(catalog_dsn, upstream.url)
    path.write_text(good)
    seen: list[str] = []
    app = create_app(str(path))
    async with serving(app) as url:
        async with http.get(f"{url}/products/3") as resp:
            assert resp.status == 200  # the echo carries the secrets back: not checked
        assert any(HEADER_SECRET in str(s.headers) for s in upstream.seen)  # really sent
        async with http.get(f"{url}/admin/config", headers=AUTH) as resp:
            assert resp.status == 200
            shown = await resp.text()
        assert "***" in shown and "{product.category}" in shown
        seen.append(shown)
        # A bad variant: a typo in a source name, next to the same secrets.
        write_atomically(path, good.replace("source: up\n", "source: upp\n"))
        async with http.post(f"{url}/admin/reload", headers=AUTH) as resp:
            assert resp.status == 400
            seen.append(await resp.text())
        assert "unknown source 'upp'" in seen[-1]
        await asyncio.wait_for(app.state.gateway.reload_logged(), 10)  # as SIGHUP does
    out, err = capfd.readouterr()
    assert "config_reload_refused" in out + err
    seen += [out, err]
    assert cli.check(str(path)) == 1
    out, err = capfd.readouterr()
    assert "unknown source 'upp'" in err
    for text in [*seen, out, err]:
        assert_no_literal(text)


# --- item 8 (b): /readyz -------------------------------------------------------------------------

PROBE_YAML = """\
version: 1
cache: {{url: "memory://"}}
sources:
  db: {{kind: sql, dsn: "{catalog}", timeout_ms: 2000}}
  up: {{kind: http, base_url: "{up}", timeout_ms: 2000}}
  dead: {{kind: http, base_url: "http://127.0.0.1:{dead}", timeout_ms: 2000}}
endpoints:
  - path: /products/{{id:int}}
    deadline_ms: 4000
    calls:
      product: {{source: db, query: "SELECT id FROM products WHERE id = %(id)s", one: true}}
      recs: {{source: up, path: "/recs/{{id}}", fallback: null}}
      gone: {{source: dead, path: "/x/{{id}}", fallback: null}}
"""


def probe_config(catalog: str, up: str, dead: int) -> config.LoadedConfig:
    return config.loads(PROBE_YAML.format(catalog=catalog, up=up, dead=dead), "probe.yaml", {})


async def ready_until_known(
    http: aiohttp.ClientSession, url: str, within_s: float = 10.0
) -> tuple[int, str]:
    """Probe until every source's state is known (bounded); return the last status and body."""
    ends = time.monotonic() + within_s
    while True:
        async with http.get(f"{url}/readyz") as resp:
            status, text = resp.status, await resp.text()
        body = orjson.loads(text)
        states = [s.get("state") for s in body.get("sources", {}).values()]
        if (states and "unknown" not in states) or time.monotonic() > ends:
            return status, text
        await asyncio.sleep(0.2)


async def test_readyz_stays_200_with_a_source_down_and_names_it_without_its_address(
    catalog_dsn: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    dead = free_port()
    async with serving(create_app(loaded=probe_config(catalog_dsn, upstream.url, dead))) as url:
        status, text = await ready_until_known(http, url)
    assert status == 200, text
    body = orjson.loads(text)
    assert body["status"] == "ready"
    assert body["sources"]["dead"]["state"] == "down"
    assert body["sources"]["dead"]["reason"] == "unavailable"
    assert body["sources"]["up"]["state"] == "up" and body["sources"]["db"]["state"] == "up"
    assert body["cache"]["state"] == "up"
    # No address, port or driver text: a probe endpoint is not a map of the network.
    for leak in ("127.0.0.1", str(dead), upstream.url.rsplit(":", 1)[1], "onnect", "rrno"):
        assert leak not in text, leak


async def test_fifty_concurrent_probes_ping_each_source_at_most_once_a_second(
    catalog_dsn: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    def pings() -> int:
        return sum(1 for s in upstream.seen if s.path == "/")

    async with serving(
        create_app(loaded=probe_config(catalog_dsn, upstream.url, free_port()))
    ) as url:
        assert pings() == 0
        began = time.monotonic()
        answers = await asyncio.gather(*(http.get(f"{url}/readyz") for _ in range(50)))
        statuses = [r.status for r in answers]
        for r in answers:
            r.release()
        elapsed = time.monotonic() - began
        # One ping per started second at most: 50 probes inside one second share one ping.
        assert 1 <= pings() <= 1 + int(elapsed), (pings(), elapsed)
        assert statuses == [200] * 50  # `dead` is down: readiness is not about it
        before = pings()
        await asyncio.sleep(1.2)
        await ready_until_known(http, url)
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200
        assert pings() > before  # the state is refreshed once a second has passed


async def test_readyz_is_503_only_while_draining_or_starting(
    catalog_dsn: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    loaded = probe_config(catalog_dsn, upstream.url, free_port())
    app = create_app(loaded=loaded)
    gw = app.state.gateway
    status, body = await Readiness().answer(gw)  # the lifespan has not started it yet
    assert (status, body["status"]) == (503, "starting")
    async with serving(app) as url:
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200
        gw.draining = True
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200  # alive, just not taking new work
        gw.draining = False


# --- item 9: personal answers are never `public` ------------------------------------------------

PERSONAL_YAML = """\
version: 1
cache: {{url: "memory://"}}
sources:
  me: {{kind: http, base_url: "{up}", timeout_ms: 2000}}
endpoints:
  - path: /me/{{id:int}}
    deadline_ms: 4000
    calls:
      me: {{source: me, path: "/me/{{id}}", forward_headers: [Authorization], required: true}}
  - path: /cart/{{id:int}}
    deadline_ms: 4000
    cache: {{ttl_s: 60, vary: [cookie]}}
    calls:
      cart: {{source: me, path: "/cart/{{id}}", forward_headers: [Cookie], required: true}}
"""


@pytest.mark.parametrize("target", ["/me/1", "/cart/1"])
async def test_an_answer_built_from_authorization_or_cookie_is_never_public(
    target: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    upstream.route("/me/", json_body({"name": "ann"}))
    upstream.route("/cart/", json_body({"items": 2}))
    loaded = config.loads(PERSONAL_YAML.format(up=upstream.url), "personal.yaml", {})
    personal = {"Authorization": "Bearer ann-token", "Cookie": "session=ann"}
    async with serving(create_app(loaded=loaded)) as url:
        for _ in range(2):  # a miss, then (on the cached endpoint) a hit
            async with http.get(f"{url}{target}", headers=personal) as resp:
                assert resp.status == 200
                cache_control = resp.headers["Cache-Control"]
            # `public` would let a shared cache hand one user's answer to the next.
            assert "public" not in cache_control, cache_control
            assert cache_control.startswith("private"), cache_control


# --- item 9: the admin token has a minimum length ---------------------------------------------

SHORT_TOKENS = ["x", "admin", "admin-token", "fifteen-chars!!"]


@pytest.mark.parametrize("short", SHORT_TOKENS)
def test_a_short_admin_token_refuses_to_start_the_app(
    short: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", short)
    loaded = probe_config("sqlite:///nowhere.db", "http://127.0.0.1:9", 9)
    with pytest.raises(ValueError, match=r"GATEWAY_ADMIN_TOKEN.*at least 16"):
        create_app(loaded=loaded)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "x" * 16)
    assert "/admin/config" in create_app(loaded=loaded).openapi()["paths"]


async def test_gateway_serve_with_a_short_admin_token_exits_with_a_clear_message(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        PROBE_YAML.format(catalog="sqlite:///nowhere.db", up="http://127.0.0.1:9", dead=9)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(path),
        "--port",
        str(free_port()),
        env={**os.environ, "GATEWAY_ADMIN_TOKEN": "admin-token"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    message = err.decode()
    assert "GATEWAY_ADMIN_TOKEN" in message and "at least 16" in message, message
    assert "Traceback" not in message and "admin-token" not in message


# --- item 9: the demo's simulated services stay on loopback -----------------------------------


def listening_hosts(port: int) -> set[str]:
    """Return the local addresses of the sockets listening on TCP `port` (Linux /proc/net)."""
    hosts = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port and len(address) == width:
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
                packed = b"".join(words)
                hosts.add(
                    socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, packed)
                )
    return hosts


async def test_demo_on_all_interfaces_keeps_its_simulators_on_loopback() -> None:
    port = free_port()
    proc = await start_demo(port, "--host", "0.0.0.0", GATEWAY_LOG_LEVEL="warning")
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not printed or not printed[-1].startswith("try:"):
                line = (await proc.stdout.readline()).decode()
                assert line, f"the demo stopped: {printed}"
                printed.append(line.rstrip())
        sims = {
            int(m.group(1)) for line in printed if (m := re.search(r"http://[^ ]+:(\d+)$", line))
        }
        assert len(sims) == 4, printed
        for sim_port in sims:
            hosts = listening_hosts(sim_port)
            assert hosts and hosts <= {"127.0.0.1", "::1"}, (sim_port, hosts)
        # The gateway itself listens where it was told to.
        await wait_healthy(f"http://127.0.0.1:{port}", proc, None, within_s=30)
        assert listening_hosts(port) == {"0.0.0.0"}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.communicate(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# --- item 9: /docs and /redoc work without the internet ----------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_every_asset_from_the_gateway_itself(
    page: str, upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    loaded = config.loads(PERSONAL_YAML.format(up=upstream.url), "personal.yaml", {})
    async with serving(create_app(loaded=loaded)) as url:
        async with http.get(f"{url}{page}") as resp:
            assert resp.status == 200
            html = await resp.text()
        # Attribute URLs, the spec URL Swagger UI is given, and ReDoc's spec-url.
        refs = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html)
        refs += re.findall(r"\burl: '([^']+)'", html)
        assert refs, html
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), html
        for ref in refs:
            assert ref.startswith("/") and not ref.startswith("//"), ref
            async with http.get(f"{url}{ref}") as resp:
                assert resp.status == 200, ref
                assert len(await resp.read()) > 0, ref
        assert any(r.endswith(".js") for r in refs) and "/openapi.json" in refs
