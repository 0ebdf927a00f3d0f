"""The gateway's own CPU cost per request, with instant in-process sources.

No network, no database: every source answers at once, so what is measured is the gateway
itself (ASGI stack, routing, parameters, plan, executor, policies, merge, encode, cache, access
log, metrics). CPU time of this process (`time.process_time`) is steady on a shared machine.

    python bench/overhead.py [--requests 20000] [--concurrency 8] 2>/dev/null

(The access log is part of the cost, so it is written; send stderr away.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import create_app  # noqa: E402
from gateway.config import loader as config  # noqa: E402
from gateway.core.plan import guard  # noqa: E402
from gateway.core.types import Call, Upstream  # noqa: E402
from tests.support import scope  # noqa: E402

PRODUCT = {"id": 1, "sku": "SKU-1", "name": "Lamp", "brand": "Acme", "category": "lighting"}
BODIES: dict[str, Any] = {
    "catalog": PRODUCT,
    "pricing": {"currency": "USD", "amount": 19.99, "discount": 0.1},
    "inventory": {"available": 3, "warehouse": "north"},
    "reviews": {"average": 4.5, "count": 12, "top": [{"rating": 5, "text": "Great."}]},
    "recs": {"product_ids": [1, 2, 3, 4, 5], "category": "lighting"},
}


def instant(name: str) -> Upstream:
    body = BODIES[name]

    async def call(c: Call) -> Any:
        return body

    async def nothing() -> None:
        return None

    return Upstream(call=call, close=nothing, ping=nothing, pool_stats=lambda: {})


async def measure(requests: int, concurrency: int, cached: bool) -> float:
    text = (
        (ROOT / "gateway.yaml")
        .read_text()
        .replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "memory://")
    )
    if not cached:
        text = re.sub(r"    cache: \{.*?\]\}\n", "", text, flags=re.S)  # the endpoint's cache
    loaded = config.loads(text, "gateway.yaml", {})
    app = create_app(loaded=loaded)
    gw = app.state.gateway
    async with app.router.lifespan_context(app):
        rt = gw.current()
        await asyncio.gather(*(u.close() for u in rt.upstreams.values()))
        upstreams = {n: instant(n) for n in rt.upstreams}
        guards = {n: guard(n, loaded.config.sources[n], u) for n, u in upstreams.items()}
        sources = {n: g.call for n, g in guards.items()}
        for runner in rt.runners.values():
            runner.sources = sources  # each endpoint's runner calls the instant sources
        gw._runtime = dataclasses.replace(rt, upstreams=upstreams, guards=guards)

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        statuses: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        first = [{"type": "http.request", "body": b"", "more_body": False}]

        async def one(i: int) -> None:
            pending = list(first)

            async def recv() -> dict[str, Any]:
                return pending.pop() if pending else await receive()

            await app(scope(f"/products/{(i % 100) + 1 if cached else i + 1}"), recv, send)

        async def worker(k: int) -> None:
            for i in range(k, requests, concurrency):
                await one(i)

        await asyncio.gather(*(worker(k) for k in range(min(concurrency, 100))))  # warm-up
        statuses.clear()
        t0 = time.process_time()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        cpu = time.process_time() - t0
    assert statuses.count(200) == requests, statuses[:5]
    return cpu / requests * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    import uvloop

    for cached in (False, True):
        ms = uvloop.run(measure(args.requests, args.concurrency, cached))
        label = "hit (cached endpoint, 100 hot ids)" if cached else "miss (no endpoint cache)"
        print(f"{label}: {ms * 1000:.1f} us CPU per request")


if __name__ == "__main__":
    main()
