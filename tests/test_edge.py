"""The edge at the ASGI level: what a client that goes away, or sends junk, gets and costs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.catalog import seed_sqlite
from gateway.simulator import Simulators
from tests.serving import product_view_config, product_view_env
from tests.support import scope


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
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.05)  # the client gives up after 50 ms
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with app.router.lifespan_context(app):
        with capture_logs() as logs:
            t0 = time.monotonic()
            await app(scope("/products/42"), receive, send)
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
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with app.router.lifespan_context(app):
        await app(scope("/products/42"), receive, send)
    assert sent[0]["status"] == 200
    assert b'"complete":true' in sent[1]["body"]
