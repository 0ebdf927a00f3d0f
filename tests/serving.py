"""Run the real app under uvicorn on a loopback port, in the test's own event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from gateway.app import create_app
from gateway.config import loader as config
from gateway.demo.simulator import Simulators
from gateway.edge.server import http_protocol
from tests.config_files import server_env
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent


def product_view_env(sims: Simulators, catalog_dsn: str, cache_url: str) -> dict[str, str]:
    """Return the environment that points the shipped gateway.yaml at test servers."""
    return server_env(sims, catalog_dsn, cache_url, admin_token=None)


def product_view_config(
    env: Mapping[str, str], key_prefix: str = "gw:", edit: Mapping[str, str] | None = None
) -> config.LoadedConfig:
    """Return the shipped gateway.yaml, loaded with `env`, its cache under `key_prefix`.

    `edit` replaces text in the file first (one exact occurrence each), for variants.
    """
    text = (ROOT / "gateway.yaml").read_text()
    for old, new in (edit or {}).items():
        assert text.count(old) == 1, f"{old!r} must occur once in gateway.yaml"
        text = text.replace(old, new)
    text = text.replace("cache:\n  url:", f"cache:\n  key_prefix: '{key_prefix}'\n  url:", 1)
    return config.loads(text, "gateway.yaml", env)


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` (lifespan included) on a free loopback port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="error",
            access_log=False,
            lifespan="on",
            http=http_protocol(),  # as `gateway serve` runs it
        )
    )
    server.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        task.cancel()
        raise RuntimeError("uvicorn did not start within 5 s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@asynccontextmanager
async def serving_config(loaded: config.LoadedConfig) -> AsyncIterator[str]:
    """Serve the gateway for a loaded config; yield its base URL."""
    async with serving(create_app(loaded=loaded)) as url:
        yield url
