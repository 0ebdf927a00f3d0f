"""`gateway demo`: the whole product on one machine with nothing but this package installed."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from importlib import resources

import uvicorn

from gateway.app import create_app
from gateway.config import loader as config
from gateway.demo.catalog import seed_mysql, seed_sqlite
from gateway.demo.simulator import start_simulators
from gateway.edge.server import uvicorn_options

PRODUCTS = 10_000
LOOPBACK = "127.0.0.1"
"""Where the simulated services listen, whatever `--host` the gateway is given."""


def example_path() -> str:
    """Return the path of the shipped product-view config (the same as the repo's gateway.yaml)."""
    return str(resources.files("gateway") / "example.yaml")


def run(host: str, port: int, *, mysql: str | None = None, redis: str | None = None) -> int:
    """Run the demo until Ctrl-C; return the exit status."""
    import uvloop

    # A plain loop, not asyncio.run: its Ctrl-C handler would cancel the clean-up that follows
    # uvicorn's own graceful shutdown (uvicorn raises the signal again once it has stopped).
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve_demo(host, port, mysql=mysql, redis=redis))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


async def serve_demo(
    host: str, port: int, *, mysql: str | None = None, redis: str | None = None
) -> None:
    """Start the simulated services and the catalog, then serve the gateway on them."""
    workdir = tempfile.mkdtemp(prefix="gateway-demo-")
    # Loopback whatever `host` is: the simulators answer anything (and can be told to fail or
    # hang); only the gateway itself is for other machines to reach.
    sims = await start_simulators(LOOPBACK)
    try:
        if mysql:
            await seed_mysql(mysql, PRODUCTS)
            dsn = mysql
        else:
            path = os.path.join(workdir, "catalog.db")
            await asyncio.to_thread(seed_sqlite, path, PRODUCTS)
            dsn = f"sqlite:///{path}"
        # Into the process environment, not just this load: a reload (SIGHUP, /admin/reload)
        # reads the file again and must point at the same simulated services.
        os.environ.update(
            {
                "CATALOG_DSN": dsn,
                "REDIS_URL": redis or "memory://",
                "PRICING_URL": sims.urls["pricing"],
                "INVENTORY_URL": sims.urls["inventory"],
                "REVIEWS_URL": sims.urls["reviews"],
                "RECS_URL": sims.urls["recs"],
            }
        )
        loaded = config.load(example_path())
        app = create_app(loaded=loaded)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                **uvicorn_options(loaded.config.server.limits()),
            )
        )
        base = f"http://{host}:{port}"
        print(
            f"gateway demo: catalog {'MySQL' if mysql else 'SQLite'} ({PRODUCTS} products), "
            f"cache {'Redis' if redis else 'in memory'}, simulated services:",
            flush=True,
        )
        for name, url in sims.urls.items():
            print(f"  {name:<10} {url}", flush=True)
        print(
            f"try:\n  curl -i {base}/products/42\n  curl -s '{base}/products?ids=3,1,2'\n"
            f"  curl -s {base}/categories/toys/products\n  {base}/docs\n  {base}/readyz\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        try:
            await server.serve()
        except KeyboardInterrupt:
            pass  # the Ctrl-C uvicorn handled (it has shut down), raised again by uvicorn
    finally:
        await sims.close()
        shutil.rmtree(workdir, ignore_errors=True)
