"""The edge at the ASGI level: what a client that goes away, or sends junk, gets and costs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.demo.catalog import seed_sqlite
from gateway.demo.simulator import Simulators
from tests.serving import product_view_config, product_view_env
from tests.support import asgi_get


@pytest.fixture
def sqlite_catalog(tmp_path: Path) -> str:
    path = tmp_path / "catalog.db"
    seed_sqlite(str(path), 100)
    return f"sqlite:///{path}"


async def test_client_disconnect_cancels_the_fan_out_and_sends_nothing(
    sims: Simulators, sqlite_catalog: str
) -> None:
    for name in ("pricing", "inventory", "reviews", "recs"):
        sims.behaviour(name).update({"hang_rate": 1.0})
    app = create_app(
        loaded=product_view_config(product_view_env(sims, sqlite_catalog, "memory://"))
    )
    async with app.router.lifespan_context(app):
        with capture_logs() as logs:
            t0 = time.monotonic()
            sent = await asgi_get(app, "/products/42", disconnect_after_s=0.05)  # gives up
            elapsed = time.monotonic() - t0
    assert sent == []
    assert elapsed < 0.25  # well before the 300 ms deadline the hung calls would have run to
    access = [e for e in logs if e["event"] == "request"]
    assert access and access[0]["status"] == 499


async def test_served_request_is_not_disturbed_by_the_disconnect_watcher(
    sims: Simulators, sqlite_catalog: str
) -> None:
    app = create_app(
        loaded=product_view_config(product_view_env(sims, sqlite_catalog, "memory://"))
    )
    async with app.router.lifespan_context(app):
        sent = await asgi_get(app, "/products/42", disconnect_after_s=30)
    assert sent[0]["status"] == 200
    assert b'"complete":true' in sent[1]["body"]
