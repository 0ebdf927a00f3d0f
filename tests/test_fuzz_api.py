"""Fuzz the running app from its own /openapi.json with schemathesis, admin routes included (with
the token): no undeclared 5xx, and every response conforms to its declared status codes, content
type and schema.

The app is the shipped gateway.yaml against the simulated services and the real MariaDB
catalog, served by uvicorn on loopback from a thread of its own (schemathesis calls are
blocking). Bounded: `MAX_EXAMPLES` per operation and generation mode.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.config import loader as config
from gateway.demo.catalog import seed_mysql
from gateway.demo.simulator import SERVICES, Simulators, start_simulators
from tests.config_files import GENEROUS, set_server_env, write_config
from tests.serving import serving_config

MAX_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "40"))
TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN = {
    "GET /admin/config",
    "POST /admin/reload",
    "GET /admin/sources",
    "GET /admin/debug/memory",
    "GET /admin/dashboard",
    "POST /admin/cache/purge",
}
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
SHIPPED = (Path(__file__).resolve().parent.parent / "gateway.yaml").read_text()
NEAR = """\
  - path: /near/{lat:float}/{tag}
    deadline_ms: 5000
    calls:
      recs: {source: recs, path: /recommendations/7, query: {lat: "{lat}", tag: "{tag}"}}
      rows:
        source: catalog
        query: "SELECT id FROM products WHERE price > %(lat)s AND category = %(tag)s LIMIT 3"
"""
"""An endpoint with a float and a str parameter, appended to the shipped config: their bounds
(finite; 256 characters) are fuzzed too, and positive values reach MariaDB and a service."""


@pytest.fixture(scope="session")
def catalog_dsn(mysql_url: str) -> str:
    """The test database, seeded with the products table."""
    asyncio.run(seed_mysql(mysql_url, 500))
    return mysql_url


@pytest.fixture
def app_url(
    catalog_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Simulators]]:
    """Serve the shipped config (its timeouts generous) from a thread, admin enabled; yield its
    base URL and the simulated services (their `behaviour` dicts may be changed from the test's
    thread). The config is a file and its variables are in the environment, so a fuzzed
    `POST /admin/reload` reloads the same config, as it would in production."""
    ready: list[tuple[str, Simulators]] = []
    started = threading.Event()
    stops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failed: list[BaseException] = []

    async def run() -> None:
        sims = await start_simulators()
        try:
            text = SHIPPED
            for old, new in GENEROUS.items():
                text = text.replace(old, new)
            text = text.rstrip("\n") + "\n" + NEAR
            path = write_config(tmp_path, text)
            set_server_env(monkeypatch, sims, catalog_dsn, "memory://", TOKEN)
            loaded = config.load(str(path))
            stop = asyncio.Event()
            stops.append((asyncio.get_running_loop(), stop))
            async with serving_config(loaded) as url:
                ready.append((url, sims))
                started.set()
                await stop.wait()
        finally:
            await sims.close()

    def main() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            failed.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=main, name="fuzzed-gateway", daemon=True)
    thread.start()
    assert started.wait(30), "the gateway did not start within 30 s"
    assert ready, failed
    try:
        yield ready[0]
    finally:
        loop, stop = stops[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the gateway did not stop within 30 s"
        assert not failed, failed


def declared_5xx(operation: Any) -> set[int]:
    return {int(code) for code in operation.definition.raw["responses"] if code.startswith("5")}


@pytest.mark.timeout(120)
def test_fuzzed_requests_get_only_declared_statuses_and_schema_conforming_bodies(
    app_url: tuple[str, Simulators],
) -> None:
    base_url, sims = app_url
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=10)
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), results  # the app's OpenAPI is valid
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    labels = {op.label for op in operations}
    assert {
        "GET /products/{id}",
        "GET /near/{lat}/{tag}",
        "GET /healthz",
        "GET /readyz",
        *ADMIN,
    } <= labels, labels
    statuses: Counter[tuple[str, int]] = Counter()
    with requests.Session() as session:
        for operation in operations:
            # Negative data needs something to break: an operation with parameters.
            has_inputs = bool(operation.definition.raw.get("parameters"))
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 1 + has_inputs]:
                fuzz(operation, mode, base_url, session, statuses)
        # Again with every service failing half the time: partial documents and fallbacks.
        for name in SERVICES:
            sims.behaviour(name).update({"error_rate": 0.5})
        (products,) = [op for op in operations if op.label == "GET /products/{id}"]
        fuzz(products, GenerationMode.POSITIVE, base_url, session, statuses)
    print("fuzzed:", dict(sorted(statuses.items())))
    seen = {s for (label, s) in statuses if label == "GET /products/{id}"}
    assert 200 in seen and 422 in seen, statuses  # both kinds of input were tried
    assert {200, 422} <= {s for (label, s) in statuses if label == "GET /near/{lat}/{tag}"}
    # The admin routes were fuzzed behind the token, not just turned away at the door.
    assert all(statuses[(label, 200)] for label in ADMIN - {"GET /admin/debug/memory"}), statuses
    assert statuses[("GET /admin/debug/memory", 409)], statuses  # tracemalloc is off here
    assert statuses[("POST /admin/cache/purge", 422)], statuses  # negative bodies were tried


def fuzz(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    statuses: Counter[tuple[str, int]],
) -> None:
    """Run `MAX_EXAMPLES` generated requests of one operation and check each response."""
    allowed_5xx = declared_5xx(operation)

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, timeout=10, headers=AUTH)
        statuses[(operation.label, response.status_code)] += 1
        # not_a_server_error, adapted: a 5xx fails unless the operation declares it
        # (502/503/504 when a required call fails).
        assert response.status_code < 500 or response.status_code in allowed_5xx, (
            case.as_curl_command(),
            response.status_code,
            response.text[:500],
        )
        case.validate_response(response, checks=CHECKS)

    one()


HOSTILE_PARAMETERS = [
    f"/products/{2**63}",
    f"/products/{-(2**63) - 1}",
    f"/products/{2**64 - 1}",
    "/products/" + "9" * 40,
    "/near/nan/home",
    "/near/NaN/home",
    "/near/inf/home",
    "/near/-inf/home",
    "/near/Infinity/home",
    "/near/1e309/home",
    "/near/-1e309/home",
    "/near/1.5/" + "t" * 257,
]
"""Values past the parameters' bounds, which schemathesis draws only by chance: each a 422."""


def test_parameters_past_their_bounds_are_422_and_reach_no_source(
    app_url: tuple[str, Simulators],
) -> None:
    base_url, sims = app_url
    before = sims.counts()
    with requests.Session() as session:
        for target in HOSTILE_PARAMETERS:
            response = session.get(base_url + target, timeout=10)
            assert response.status_code == 422, (target, response.text[:300])
            (error,) = response.json()["detail"]
            assert error["loc"][0] == "path", (target, error)
        assert sims.counts() == before
        for target in (f"/products/{2**63 - 1}", "/near/1.5e308/" + "t" * 256):
            response = session.get(base_url + target, timeout=10)
            assert response.status_code in (200, 404), (target, response.text[:300])
        assert sims.counts() != before  # values at the bounds do reach the services
