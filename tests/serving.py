"""Run the real app under uvicorn on a loopback port, in the test's own event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.app import create_app
from gateway.config import loader as config
from gateway.contracts.run import serving
from gateway.demo.simulator import Simulators
from tests.config_files import server_env

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
async def serving_config(loaded: config.LoadedConfig) -> AsyncIterator[str]:
    """Serve the gateway for a loaded config; yield its base URL."""
    async with serving(create_app(loaded=loaded)) as url:
        yield url
