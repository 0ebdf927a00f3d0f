"""The floor: a hand-written aggregator for the same fan-out as the gateway's /products/{id}.

No framework beyond aiohttp and no config: one aiohttp server, one keep-alive ClientSession, one
aiomysql pool, orjson. It makes the calls of gateway.yaml with the same timeouts, the same
retry of pricing, the same fallbacks and the same response shape, so the gateway's cost can be
read against it. Run: python bench/baseline.py --port 8200 --mysql DSN --upstreams P,I,R,C
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import aiomysql
import orjson
from aiohttp import web

SQL = "SELECT id, sku, name, brand, category FROM products WHERE id = %s"
DEADLINE_S = 0.300
SQL_TIMEOUT_S = 0.150
PRICING_TIMEOUT_S, PRICING_BACKOFF_S = 0.120, 0.010
INVENTORY_TIMEOUT_S, REVIEWS_TIMEOUT_S, RECS_TIMEOUT_S = 0.100, 0.200, 0.150
PRICING_HEADERS = {"Authorization": "Bearer dev"}
_RETRY_STATUSES = frozenset({502, 503, 504})
_PRICE_FALLBACK = {"currency": "USD", "amount": None}
_JSON = "application/json"


class Failed(Exception):
    """A call failed; `reason` is the outcome reported in `_meta.sources`."""

    def __init__(self, reason: str, status: int = 0) -> None:
        self.reason = reason
        self.status = status


class Aggregator:
    """The fan-out for one product: SQL, pricing, inventory, reviews, then recs after SQL."""

    def __init__(self, session: aiohttp.ClientSession, pool: aiomysql.Pool, urls: list[str]):
        self.session = session
        self.pool = pool
        self.pricing, self.inventory, self.reviews, self.recs = urls

    async def get(self, url: str, budget: float, **kw: Any) -> Any:
        """Return the decoded JSON of one GET, or raise `Failed` with timeout/error/not_found."""
        try:
            async with asyncio.timeout(budget):
                async with self.session.get(url, **kw) as resp:
                    if resp.status != 200:
                        reason = "not_found" if resp.status == 404 else "error"
                        raise Failed(reason, resp.status)
                    return orjson.loads(await resp.read())
        except TimeoutError:
            raise Failed("timeout") from None
        except (aiohttp.ClientError, orjson.JSONDecodeError):
            raise Failed("error") from None

    async def product(self, product_id: int, deadline: float) -> Any:
        """Return the catalog row, None when there is none, or raise `Failed`."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(SQL_TIMEOUT_S, deadline - loop.time())):
                async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
                    await cur.execute(SQL, (product_id,))
                    return await cur.fetchone()
        except TimeoutError:
            raise Failed("timeout") from None
        except aiomysql.Error:
            raise Failed("error") from None

    async def price(self, product_id: int, deadline: float) -> Any:
        """Return pricing's answer, retried once on timeout, connect error or 502/503/504."""
        loop = asyncio.get_running_loop()
        url = f"{self.pricing}/prices/{product_id}"
        try:
            return await self.get(url, PRICING_TIMEOUT_S, headers=PRICING_HEADERS)
        except Failed as exc:
            retryable = exc.reason == "timeout" or exc.status in _RETRY_STATUSES
            remaining = deadline - loop.time() - PRICING_BACKOFF_S
            # Like the gateway: a retry starts only when the deadline leaves room for it.
            if not retryable or remaining <= 0.005:
                raise
        await asyncio.sleep(PRICING_BACKOFF_S)
        timeout = min(PRICING_TIMEOUT_S, deadline - loop.time())
        return await self.get(url, timeout, headers=PRICING_HEADERS)

    async def handle(self, request: web.Request) -> web.Response:
        """Answer GET /products/{id} with the merged document, like the gateway's."""
        raw = request.match_info["id"]
        if not raw.isdigit() or len(raw) > 9:
            return web.Response(
                status=422, body=b'{"detail":"id must be an integer"}', content_type=_JSON
            )
        product_id = int(raw)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        # Three tasks, and the SQL-then-recs chain in this task: the fewest tasks for the DAG.
        price = asyncio.create_task(self.price(product_id, deadline))
        stock = asyncio.create_task(
            self.get(f"{self.inventory}/stock/{product_id}", INVENTORY_TIMEOUT_S)
        )
        reviews = asyncio.create_task(
            self.get(f"{self.reviews}/products/{product_id}/reviews", REVIEWS_TIMEOUT_S)
        )
        try:
            product = await self.product(product_id, deadline)
        except Failed as exc:
            await _cancel(price, stock, reviews)
            return _error(504 if exc.reason == "timeout" else 502, f"product: {exc.reason}")
        if product is None:
            await _cancel(price, stock, reviews)
            return _error(404, "product: not found")
        sources: dict[str, str] = {}
        doc: dict[str, Any] = {"product": product}
        try:
            timeout = min(RECS_TIMEOUT_S, deadline - loop.time())
            recs = await self.get(
                f"{self.recs}/recommendations/{product_id}",
                timeout,
                params={"category": product["category"]},
            )
        except Failed as exc:
            recs, sources["recommendations"] = {"product_ids": []}, exc.reason
        try:
            doc["price"] = await price
        except Failed as exc:
            doc["price"], sources["price"] = _PRICE_FALLBACK, exc.reason
        try:
            doc["stock"] = {"available": (await stock)["available"]}
        except Failed as exc:
            doc["stock"], sources["stock"] = None, exc.reason
        try:
            doc["reviews"] = await reviews
        except Failed as exc:
            sources["reviews"] = exc.reason
        doc["recommendations"] = recs
        doc["_meta"] = {"complete": not sources, "sources": sources}
        return web.Response(
            body=orjson.dumps(doc),
            content_type=_JSON,
            headers={"X-Gateway-Complete": "false" if sources else "true"},
        )


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    # Collects what finished before the cancel, so no "exception never retrieved" noise.
    await asyncio.gather(*tasks, return_exceptions=True)


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type=_JSON)


async def healthz(request: web.Request) -> web.Response:
    """Answer 200 once the server is up (the bench polls it before loading)."""
    return web.Response(body=b'{"ok":true}', content_type=_JSON)


async def serve(port: int, mysql: str, upstreams: list[str]) -> None:
    """Run the baseline on 127.0.0.1:`port` until cancelled."""
    parts = urlsplit(mysql)
    pool = await aiomysql.create_pool(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        db=parts.path.lstrip("/"),
        minsize=2,
        maxsize=20,
        autocommit=True,
    )
    # No aiohttp total timeout: each call has its own asyncio.timeout, one timer per call.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0, limit_per_host=100, keepalive_timeout=30, ttl_dns_cache=None
        ),
        timeout=aiohttp.ClientTimeout(),
        skip_auto_headers=("User-Agent",),
    )
    app = web.Application()
    aggregator = Aggregator(session, pool, [u.rstrip("/") for u in upstreams])
    app.add_routes([web.get("/products/{id}", aggregator.handle), web.get("/healthz", healthz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"baseline on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()
        pool.close()
        await pool.wait_closed()


def main() -> None:
    """Parse the command line and run the baseline until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--mysql", default="mysql://root@127.0.0.1:3306/gwbench")
    parser.add_argument(
        "--upstreams",
        default="http://127.0.0.1:9101,http://127.0.0.1:9102,http://127.0.0.1:9103,"
        "http://127.0.0.1:9104",
        help="pricing,inventory,reviews,recs base URLs",
    )
    args = parser.parse_args()
    urls = args.upstreams.split(",")
    if len(urls) != 4:
        parser.error("--upstreams needs four URLs: pricing,inventory,reviews,recs")
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(args.port, args.mysql, urls))


if __name__ == "__main__":
    main()
