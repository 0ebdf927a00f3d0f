"""The fake upstream HTTP services, on loopback: the one used by tests, bench, reliability and the
demo (it ships in the package because `gateway demo` runs it).

`UpstreamServer` answers by path prefix with plain handler functions and records what it received;
tests script it with the handler factories below:

    async with UpstreamServer() as server:
        server.route("/prices/", json_body({"amount": 1}))
        server.route("/slow/", slow(5, json_body({})))
        ... server.url, server.seen[-1].path ...

The simulated product services are handlers served by it, one server each, each with a single
and a batch route (the batch answers a JSON array of the single bodies, each with "product_id"):

    pricing    GET /prices/{id}                 GET /prices?ids=1,2,3
    inventory  GET /stock/{id}                  GET /stock?ids=1,2,3
    reviews    GET /products/{id}/reviews       GET /reviews?ids=1,2,3
    recs       GET /recommendations/{id}        GET /recommendations?ids=1,2,3   (?category=...)

Their bodies are derived from the product id alone, so any two runs, processes or tests agree on
them. A `Behaviour` (delay, jitter, error and hang rates) can be changed
in-process or over HTTP on the same port (`POST /_control`). Run all four with
`python -m gateway.demo.simulator --port-base 9101`.

Every scripted wait is bounded and ends early when the server closes. One module over 300 lines,
on purpose: it is the one fake upstream, and its two faces share the server and its handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from functools import lru_cache
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

MAX_WAIT_S = 30.0
"""The longest any scripted wait lasts when the server is not closed first."""

_JSON = "application/json"


# --- the server --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the server received it: the raw target (path and query, undecoded)."""

    method: str
    target: str
    headers: CIMultiDictProxy[str]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


class UpstreamServer:
    """A loopback aiohttp.web server whose answers are scripted per path prefix.

    It sees the request target exactly as sent (no router decodes or normalizes it). `record`
    keeps every request in `seen` (tests); `cancel_on_disconnect` cancels a handler whose client
    hung up (a caller that gives up ends a hang, as a real service would notice).
    """

    def __init__(self, *, record: bool = True, cancel_on_disconnect: bool = False) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[Seen] = []
        self.closing = asyncio.Event()
        self.url = ""
        self._record = record
        self._cancel = cancel_on_disconnect
        self._arrived = asyncio.Event()
        self._runner: web.ServerRunner | None = None

    def route(self, prefix: str, handler: Handler) -> None:
        """Answer requests whose raw target starts with `prefix` (the longest prefix wins)."""
        self.routes[prefix] = handler

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host`:`port` (0, the default, picks a free port); return the base URL."""
        server = web.Server(self._handle, handler_cancellation=self._cancel, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port, backlog=1024).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"
        return self.url

    async def close(self) -> None:
        """Release every waiting handler, then stop listening and close connections."""
        self.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_seen(self, count: int) -> None:
        """Wait until at least `count` requests have arrived (at most 5 s, then TimeoutError)."""
        async with asyncio.timeout(5.0):
            while len(self.seen) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def __aenter__(self) -> UpstreamServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._record:
            self.seen.append(Seen(request.method, request.raw_path, request.headers))
            self._arrived.set()
        _serving.set(self)
        matches = [p for p in self.routes if request.raw_path.startswith(p)]
        if not matches:
            return web.Response(status=404, body=b'{"error": "no route"}', content_type=_JSON)
        return await self.routes[max(matches, key=len)](request)


# Set by the server around each handler (same task), so handlers can wait on its `closing`.
_serving: ContextVar[UpstreamServer] = ContextVar("serving")


async def idle(seconds: float) -> None:
    """Sleep up to `seconds` (at most MAX_WAIT_S), ending early when the serving server closes."""
    try:
        async with asyncio.timeout(min(seconds, MAX_WAIT_S)):
            await _serving.get().closing.wait()
    except TimeoutError:
        pass


# --- scripted answers --------------------------------------------------------------------------


def json_body(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Handler:
    """Answer with `data` encoded as JSON."""
    return raw(orjson.dumps(data), status, headers)


def raw(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> Handler:
    """Answer with exactly `body` (Content-Length set), labelled as JSON."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

    return handle


def echo() -> Handler:
    """Answer with the raw target and the request headers, as JSON."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({"target": request.raw_path, "headers": dict(request.headers)})

    return handle


def slow(seconds: float, then: Handler) -> Handler:
    """Wait `seconds` (bounded, ends when the server closes) before answering like `then`."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        await idle(seconds)
        return await then(request)

    return handle


def hang() -> Handler:
    """Never answer, until the server closes."""
    return slow(MAX_WAIT_S, raw(b"null"))


def chunked(chunks: list[bytes], pause_s: float = 0.0) -> Handler:
    """Stream `chunks` chunked (no Content-Length); stop quietly if the client hangs up."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": _JSON})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for chunk in chunks:
                await resp.write(chunk)
                if pause_s:
                    await idle(pause_s)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client hung up mid-stream, which is what some tests script
        return resp

    return handle


def stall_mid_body(seconds: float, declared: int = 1000, sent: bytes = b'{"a": ') -> Handler:
    """Send headers and the start of a body, then wait `seconds` before closing the connection."""
    return _partial(declared, sent, seconds, reset=False)


def truncated(declared: int = 1000, sent: bytes = b'{"a": ') -> Handler:
    """Declare `declared` bytes, send fewer, then close the connection cleanly (FIN)."""
    return _partial(declared, sent, 0.0, reset=False)


def reset_mid_body(declared: int = 1000, sent: bytes = b'{"a": ') -> Handler:
    """Declare `declared` bytes, send fewer, then reset the connection (RST)."""
    return _partial(declared, sent, 0.0, reset=True)


def _partial(declared: int, sent: bytes, wait_s: float, reset: bool) -> Handler:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": _JSON, "Content-Length": str(declared)})
        await resp.prepare(request)
        await resp.write(sent)
        # Let the client read headers and the first bytes before the connection goes.
        await idle(max(wait_s, 0.05))
        transport = request.transport
        if transport is not None:
            if reset:
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        return resp

    return handle


COOKIES = (
    "sid=upstream-session-1; Path=/",
    "tenant=upstream-2; Path=/; Domain=localhost",
    "token=upstream-3; Path=/; Max-Age=3600; HttpOnly",
    "wide=upstream-4; Path=/; Domain=127.0.0.1",
)
"""Set-Cookie values a hostile upstream sends; none may ever come back in a `Cookie` header."""


def set_cookies(then: Handler) -> Handler:
    """Answer like `then`, with every one of `COOKIES` added as its own Set-Cookie header."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        resp = await then(request)
        for cookie in COOKIES:
            resp.headers.add("Set-Cookie", cookie)
        return resp

    return handle


@lru_cache(maxsize=4)
def gzip_bomb(inflated: int) -> bytes:
    """Return a gzip body of about `inflated / 1000` bytes that inflates to `inflated` zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(inflated // len(block))]
    parts.append(packer.compress(bytes(inflated % len(block))))
    parts.append(packer.flush())
    return b"".join(parts)


# --- the simulated product services ------------------------------------------------------------

SERVICES = ("pricing", "inventory", "reviews", "recs")
"""The simulated services, in the order of `--port-base` ports."""

MAX_ID = 1_000_000
"""Ids 1..MAX_ID exist upstream; anything else is a 404 (or absent from a batch answer)."""

_ID_DIGITS = len(str(MAX_ID))

MAX_BATCH = 1000
"""The most ids one batch request may name; more is a 400."""

HANG_S = MAX_WAIT_S
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
        delay = new.get("delay_ms", self.delay_ms) + new.get("jitter_ms", self.jitter_ms)
        if delay > MAX_WAIT_S * 1000:
            # The module's promise: every scripted wait is bounded (a plain sleep serves it).
            raise ValueError(f"delay_ms + jitter_ms must be at most {MAX_WAIT_S * 1000:.0f}")
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


# --- their handlers ----------------------------------------------------------------------------

Body = Callable[[web.BaseRequest, int], bytes]

_NOT_FOUND = orjson.dumps({"error": "not_found"})
_UNAVAILABLE = orjson.dumps({"error": "unavailable"})


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON)


def _product_id(raw: str) -> int:
    # ASCII digits only: str.isdigit() also takes "²" (int() rejects it) and "١٢" (int() reads 12).
    if raw.isascii() and raw.isdigit() and len(raw) <= _ID_DIGITS:
        product_id = int(raw)
        if product_id <= MAX_ID:
            return product_id
    return 0


async def _misbehave(service: Service) -> web.Response | None:
    """Count one request and play the behaviour: return the 503 to send, or None after any delay."""
    service.requests += 1
    b = service.behaviour
    # Draws happen only when a fault is configured, so the fault-free path stays cheap
    # and the sequence of draws depends only on the requests that could fail.
    if b.error_rate or b.hang_rate:
        draw = service.rng.random()
        if draw < b.hang_rate:
            service.hangs += 1
            await idle(HANG_S)
            return _json(_UNAVAILABLE, 503)
        if draw < b.hang_rate + b.error_rate:
            service.errors += 1
            return _json(_UNAVAILABLE, 503)
    if b.delay_ms or b.jitter_ms:
        spread = service.rng.uniform(-b.jitter_ms, b.jitter_ms) if b.jitter_ms else 0.0
        await asyncio.sleep(max(0.0, b.delay_ms + spread) / 1000)
    return None


def _served(service: Service, path: re.Pattern[str], body: Body) -> Handler:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "GET":
            return _json(b'{"error": "method not allowed"}', 405)
        found = path.fullmatch(request.path)
        if found is None:
            return _json(_NOT_FOUND, 404)
        failed = await _misbehave(service)
        if failed is not None:
            return failed
        product_id = _product_id(found.group(1))
        if not product_id:
            return _json(_NOT_FOUND, 404)
        return _json(body(request, product_id))

    return handle


def _with_id(body: bytes, product_id: int) -> bytes:
    # Splice the id into the cached object's bytes as its first field: no decode, no encode.
    head = b'{"product_id":%d' % product_id
    return head + b"}" if body == b"{}" else head + b"," + body[1:]


def _batched(service: Service, path: str, body: Body) -> Handler:
    """Answer `path?ids=1,2,3` with one object per known id, in order, once each; a malformed
    request (no `ids`, more than MAX_BATCH) is a 400 that neither counts nor plays the behaviour."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "GET":
            return _json(b'{"error": "method not allowed"}', 405)
        if request.path != path:
            return _json(_NOT_FOUND, 404)
        ids = request.query.get("ids")
        if ids is None:
            return _json(b'{"error": "the ids query value is required"}', 400)
        values = ids.split(",", MAX_BATCH)
        if len(values) > MAX_BATCH:
            return _json(b'{"error": "at most %d ids"}' % MAX_BATCH, 400)
        failed = await _misbehave(service)
        if failed is not None:
            return failed
        known = dict.fromkeys(_product_id(v) for v in values)  # ordered and deduplicated
        known.pop(0, None)  # 0 stands for every unknown or malformed id
        return _json(b"[" + b",".join(_with_id(body(request, i), i) for i in known) + b"]")

    return handle


def _only(method: str, answer: Callable[[web.BaseRequest], Awaitable[web.Response]]) -> Handler:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method != method:
            return _json(b'{"error": "method not allowed"}', 405)
        return await answer(request)

    return handle


def _control_routes(service: Service) -> dict[str, Handler]:
    async def control(request: web.BaseRequest) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            service.behaviour.update(changes)
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _json(orjson.dumps({"error": str(exc)}), 400)
        return _json(orjson.dumps(vars(service.behaviour)))

    async def stats(request: web.BaseRequest) -> web.Response:
        return _json(orjson.dumps(service.stats()))

    async def reset(request: web.BaseRequest) -> web.Response:
        service.reset()
        return _json(orjson.dumps(service.stats()))

    return {
        "/_control": _only("POST", control),
        "/_stats": _only("GET", stats),
        "/_stats/reset": _only("POST", reset),
    }


@dataclass(frozen=True, slots=True)
class _Routes:
    prefix: str  # of the single route; the batch path is a different, shorter prefix
    single: str  # the single route's path pattern, group 1 the id
    batch: str  # the batch route's exact path
    body: Body


# The router picks the longest prefix of the raw target, so "/prices/42" goes to "/prices/"
# and "/prices?ids=1" to "/prices" (whose handler also insists on the exact path).
_ROUTES: dict[str, _Routes] = {
    "pricing": _Routes("/prices/", r"/prices/([^/]+)", "/prices", lambda r, i: price_body(i)),
    "inventory": _Routes("/stock/", r"/stock/([^/]+)", "/stock", lambda r, i: stock_body(i)),
    "reviews": _Routes(
        "/products/", r"/products/([^/]+)/reviews", "/reviews", lambda r, i: reviews_body(i)
    ),
    "recs": _Routes(
        "/recommendations/",
        r"/recommendations/([^/]+)",
        "/recommendations",
        lambda r, i: recs_body(i, r.query.get("category", "")),
    ),
}


def serve_service(server: UpstreamServer, service: Service) -> None:
    """Route one simulated service's single, batch and control paths on `server`."""
    routes = _ROUTES[service.name]
    server.route(routes.prefix, _served(service, re.compile(routes.single), routes.body))
    server.route(routes.batch, _batched(service, routes.batch, routes.body))
    for control_path, handler in _control_routes(service).items():
        server.route(control_path, handler)


# --- running them ------------------------------------------------------------------------------


class Simulators:
    """The four services, started on loopback ports; `close()` stops them and ends any hang."""

    def __init__(
        self, services: dict[str, Service], servers: list[UpstreamServer], urls: dict[str, str]
    ) -> None:
        self.services = services
        self.urls = urls
        self._servers = servers

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
        for server in self._servers:
            server.closing.set()
        for server in self._servers:
            await server.close()


async def start_simulators(
    host: str = "127.0.0.1", ports: Mapping[str, int] | None = None
) -> Simulators:
    """Start the four services (port 0, the default, picks a free port) and return them."""
    ports = ports or {}
    services = {name: Service(name) for name in SERVICES}
    servers: list[UpstreamServer] = []
    urls: dict[str, str] = {}
    try:
        for name, service in services.items():
            # Not recorded (bench and demo send millions); a caller that gives up ends a hang.
            server = UpstreamServer(record=False, cancel_on_disconnect=True)
            serve_service(server, service)
            urls[name] = await server.start(host, ports.get(name, 0))
            servers.append(server)
    except BaseException:
        for server in servers:
            await server.close()
        raise
    return Simulators(services, servers, urls)


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
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.simulator", description=__doc__)
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
