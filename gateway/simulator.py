"""Simulated upstream services (pricing, inventory, reviews, recs) with run-time faults.

Each service is an aiohttp.web app on its own port. Bodies are derived from the product id
alone, so any two runs, processes or tests agree on them. A `Behaviour` (delay, jitter, error
and hang rates) can be changed in-process or over HTTP on the same port (`POST /_control`).
Run all four with `python -m gateway.simulator --port-base 9101`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web

SERVICES = ("pricing", "inventory", "reviews", "recs")
"""The simulated services, in the order of `--port-base` ports."""

MAX_ID = 1_000_000
"""Ids 1..MAX_ID exist upstream; anything else is a 404."""

HANG_S = 30.0
"""How long a hanging request sleeps: far beyond any deadline a gateway would set."""

_WAREHOUSES = ("north", "south", "east", "west")
_REVIEW_TEXTS = (
    "Does what it says.",
    "Would buy again.",
    "Arrived late but works.",
    "Better than expected.",
    "Not for me.",
    "Great value.",
)
_JSON = "application/json"


@dataclass
class Behaviour:
    """How a service misbehaves: added latency, and the share of 503s and of hangs."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    hang_rate: float = 0.0

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial change, raising `ValueError` for unknown keys or values out of range."""
        known = {f.name for f in fields(self)}
        new = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown field {key!r} (known: {', '.join(sorted(known))})")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key} must be a non-negative number")
            if key.endswith("_rate") and value > 1:
                raise ValueError(f"{key} must be between 0 and 1")
            new[key] = float(value)
        for key, value in new.items():
            setattr(self, key, value)


@dataclass
class Service:
    """One simulated service's state: its behaviour, its counters and its seeded random draws."""

    name: str
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: int = 0
    errors: int = 0
    hangs: int = 0
    rng: random.Random = field(init=False)
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def seed(self) -> int:
        """The seed of this service's draws, fixed by its name so runs are reproducible."""
        return zlib.crc32(self.name.encode())

    def stats(self) -> dict[str, Any]:
        """Return the counters and the current behaviour as JSON-ready data."""
        return {
            "service": self.name,
            "requests": self.requests,
            "errors": self.errors,
            "hangs": self.hangs,
            "behaviour": vars(self.behaviour),
        }

    def reset(self) -> None:
        """Zero the counters and restart the random draws from the seed."""
        self.requests = self.errors = self.hangs = 0
        self.rng.seed(self.seed)


# --- bodies --------------------------------------------------------------------------------


def _mix(product_id: int) -> int:
    # Knuth's multiplicative hash: neighbouring ids get unrelated-looking values.
    return (product_id * 2654435761) & 0xFFFFFFFF


@lru_cache(maxsize=1 << 16)
def price_body(product_id: int) -> bytes:
    """Return the pricing service's JSON body for one product."""
    h = _mix(product_id)
    return orjson.dumps(
        {"currency": "USD", "amount": (500 + h % 50_000) / 100, "discount": (h >> 8) % 31 / 100}
    )


@lru_cache(maxsize=1 << 16)
def stock_body(product_id: int) -> bytes:
    """Return the inventory service's JSON body for one product."""
    h = _mix(product_id)
    return orjson.dumps({"available": h % 500, "warehouse": _WAREHOUSES[(h >> 4) % 4]})


@lru_cache(maxsize=1 << 16)
def reviews_body(product_id: int) -> bytes:
    """Return the reviews service's JSON body for one product."""
    h = _mix(product_id)
    top = [
        {"rating": (h >> shift) % 5 + 1, "text": _REVIEW_TEXTS[(h >> (shift + 3)) % 6]}
        for shift in (5, 13)
    ]
    return orjson.dumps({"average": (100 + h % 401) / 100, "count": h % 1000, "top": top})


@lru_cache(maxsize=1 << 16)
def recs_body(product_id: int, category: str) -> bytes:
    """Return the recommendations service's JSON body for one product and category."""
    ids = [(product_id * 7 + k * 131) % 10_000 + 1 for k in range(1, 6)]
    return orjson.dumps({"product_ids": ids, "category": category})


# --- apps ----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NOT_FOUND = orjson.dumps({"error": "not_found"})
_UNAVAILABLE = orjson.dumps({"error": "unavailable"})


def _product_id(request: web.Request) -> int | None:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 7:
        return None
    product_id = int(raw)
    return product_id if 1 <= product_id <= MAX_ID else None


def _served(service: Service, body: Callable[[web.Request, int], bytes]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        service.requests += 1
        b = service.behaviour
        # Draws happen only when a fault is configured, so the fault-free path stays cheap
        # and the sequence of draws depends only on the requests that could fail.
        if b.error_rate or b.hang_rate:
            draw = service.rng.random()
            if draw < b.hang_rate:
                service.hangs += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(service.closing.wait(), HANG_S)
                return web.Response(body=_UNAVAILABLE, status=503, content_type=_JSON)
            if draw < b.hang_rate + b.error_rate:
                service.errors += 1
                return web.Response(body=_UNAVAILABLE, status=503, content_type=_JSON)
        if b.delay_ms or b.jitter_ms:
            spread = service.rng.uniform(-b.jitter_ms, b.jitter_ms) if b.jitter_ms else 0.0
            await asyncio.sleep(max(0.0, b.delay_ms + spread) / 1000)
        product_id = _product_id(request)
        if product_id is None:
            return web.Response(body=_NOT_FOUND, status=404, content_type=_JSON)
        return web.Response(body=body(request, product_id), content_type=_JSON)

    return handle


def _control_routes(service: Service) -> list[web.RouteDef]:
    async def control(request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            service.behaviour.update(changes)
        except (orjson.JSONDecodeError, ValueError) as exc:
            return web.Response(
                body=orjson.dumps({"error": str(exc)}), status=400, content_type=_JSON
            )
        return web.Response(body=orjson.dumps(vars(service.behaviour)), content_type=_JSON)

    async def stats(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(service.stats()), content_type=_JSON)

    async def reset(request: web.Request) -> web.Response:
        service.reset()
        return web.Response(body=orjson.dumps(service.stats()), content_type=_JSON)

    return [
        web.post("/_control", control),
        web.get("/_stats", stats),
        web.post("/_stats/reset", reset),
    ]


_ROUTES: dict[str, tuple[str, Callable[[web.Request, int], bytes]]] = {
    "pricing": ("/prices/{id}", lambda r, i: price_body(i)),
    "inventory": ("/stock/{id}", lambda r, i: stock_body(i)),
    "reviews": ("/products/{id}/reviews", lambda r, i: reviews_body(i)),
    "recs": ("/recommendations/{id}", lambda r, i: recs_body(i, r.query.get("category", ""))),
}


def service_app(service: Service) -> web.Application:
    """Return the aiohttp app of one simulated service, answering from `service`'s state."""
    path, body = _ROUTES[service.name]
    app = web.Application()
    app.add_routes([web.get(path, _served(service, body)), *_control_routes(service)])
    return app


# --- running -------------------------------------------------------------------------------


class Simulators:
    """The four services, started on loopback ports; `close()` stops them and ends any hang."""

    def __init__(
        self, services: dict[str, Service], runners: list[web.AppRunner], urls: dict[str, str]
    ) -> None:
        self.services = services
        self.urls = urls
        self._runners = runners

    def behaviour(self, name: str) -> Behaviour:
        """Return the live behaviour of one service; changing it takes effect at once."""
        return self.services[name].behaviour

    def counts(self) -> dict[str, int]:
        """Return the number of requests each service has received."""
        return {name: s.requests for name, s in self.services.items()}

    def reset(self) -> None:
        """Zero every service's counters and restart its random draws."""
        for s in self.services.values():
            s.reset()

    async def close(self) -> None:
        """Stop serving; requests that are hanging answer 503 at once instead of sleeping on."""
        for s in self.services.values():
            s.closing.set()
        for runner in self._runners:
            await runner.cleanup()


async def start_simulators(
    host: str = "127.0.0.1", ports: Mapping[str, int] | None = None
) -> Simulators:
    """Start the four services (port 0, the default, picks a free port) and return them."""
    ports = ports or {}
    services = {name: Service(name) for name in SERVICES}
    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    try:
        for name, service in services.items():
            # handler_cancellation: a caller that gives up (deadline, disconnect) ends the hang.
            runner = web.AppRunner(
                service_app(service),
                access_log=None,
                handler_cancellation=True,
                shutdown_timeout=1.0,
            )
            await runner.setup()
            site = web.TCPSite(runner, host, ports.get(name, 0), backlog=1024)
            await site.start()
            runners.append(runner)
            port = runner.addresses[0][1]
            urls[name] = f"http://{host}:{port}"
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return Simulators(services, runners, urls)


async def _serve(host: str, port_base: int) -> None:
    ports = {name: port_base + i for i, name in enumerate(SERVICES)}
    sims = await start_simulators(host, ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for name, url in sims.urls.items():
        print(f"{name:<10} {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sims.close()


def main(argv: list[str] | None = None) -> None:
    """Run the four simulated services until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m gateway.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port-base",
        type=int,
        default=9101,
        help="pricing gets this port, inventory +1, reviews +2, recs +3",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # the simulator still works, only slower
        asyncio.run(_serve(args.host, args.port_base))
    else:
        uvloop.run(_serve(args.host, args.port_base))


if __name__ == "__main__":
    main()
