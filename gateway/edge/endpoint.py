"""The HTTP edge: request -> typed parameters -> cached or fresh composite -> response bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from cache.composite import Lookup
from cache.entry import Entry, make_entry
from cache.keys import composite_key
from gateway.core.executor import Composite, execute
from gateway.core.merge import answer, with_stale_age
from gateway.core.plan import PERSONAL_HEADERS, EndpointPlan
from gateway.ops import log

if TYPE_CHECKING:
    from gateway.runtime import Runtime

_log = structlog.get_logger("gateway.edge")
JSON_TYPE = (b"content-type", b"application/json")


def parse_params(plan: EndpointPlan, raw: Mapping[str, str]) -> tuple[dict[str, Any], list[Any]]:
    """Return typed path parameters, or FastAPI-shaped validation errors for the bad ones."""
    values: dict[str, Any] = {}
    errors: list[Any] = []
    for p in plan.params:
        text = raw.get(p.name, "")
        try:
            values[p.name] = p.adapter.validate_python(text)
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                errors.append(
                    {"type": e["type"], "loc": ["path", p.name], "msg": e["msg"], "input": text}
                )
    return values, errors


class EndpointHandler:
    """The ASGI app of one endpoint route; it reads the current runtime at each request."""

    def __init__(self, current: Callable[[], Runtime], endpoint_id: str) -> None:
        self.current = current
        self.endpoint_id = endpoint_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.current()  # a request finishes on the runtime it started with
        plan = runtime.plans.get(self.endpoint_id)
        if plan is None:
            await _send(send, 404, orjson.dumps({"detail": "Not Found"}), [JSON_TYPE])
            return
        params, errors = parse_params(plan, scope.get("path_params", {}))
        if errors:
            await _send(send, 422, orjson.dumps({"detail": errors}), [JSON_TYPE])
            return
        info = log.current.get()
        request_id = info.request_id if info else ""
        if info is not None:
            info.endpoint = plan.id
        headers = dict(scope.get("headers", ()))
        fresh: list[Composite] = []
        leaving = _ClientLeaving(receive)
        loop = asyncio.get_running_loop()
        # The deadline caps everything the client waits for: cache reads, waits for another
        # request's fan-out, the fan-out, and the cache write after it (`reserve`).
        arrived = loop.time()
        deadline = arrived + plan.deadline
        cached = plan.id in runtime.cache_policies
        reserve = plan.cache_reserve if cached else 0.0

        async def compute() -> Entry:
            # A background refresh has no client waiting: it gets a whole deadline of its own.
            ends = deadline - reserve if leaving.watch_if_in_request() else None
            began = loop.time()
            composite = await execute(plan, runtime.sources, params, request_id, ends, headers)
            if ends is not None and info is not None:
                # When the fan-out began and how long it took: the rest of the request's time
                # went to the cache, waits for another fan-out and the answer's own work.
                info.fanout = (
                    round((began - arrived) * 1000, 1),
                    round((loop.time() - began) * 1000, 1),
                )
            composite, status, body = answer(plan, composite)
            fresh.append(composite)
            runtime.observe(plan, composite)  # here, so background refreshes count too
            return make_entry(status, body, status == 200 and composite.complete)

        try:
            lookup = await self._lookup(runtime, plan, params, headers, compute, deadline)
        except asyncio.CancelledError:
            if not leaving.absorb():
                raise
            if info is not None:
                info.disconnected = True
            return  # Nobody is left to answer; the fan-out was cancelled.
        finally:
            leaving.stop()
        composite = fresh[0] if fresh else None
        if info is not None:
            info.cache = lookup.state
            info.complete = lookup.entry.complete
            if composite is not None:
                info.calls = {
                    n: {"outcome": r.outcome, "ms": round(r.ms, 1)}
                    for n, r in composite.results.items()
                }
        await _respond(send, lookup, composite, headers.get(b"if-none-match"), plan)

    async def _lookup(
        self,
        runtime: Runtime,
        plan: EndpointPlan,
        params: Mapping[str, Any],
        headers: Mapping[bytes, bytes],
        compute: Callable[[], Awaitable[Entry]],
        deadline: float,
    ) -> Lookup:
        policy = runtime.cache_policies.get(plan.id)
        if policy is None:
            return Lookup(await compute(), "BYPASS", 0.0, 0.0, False)
        key = composite_key(
            runtime.cache_prefix,
            plan.id,
            plan.digest,
            [
                *((p.name, params[p.name]) for p in plan.params),
                # Header names are not identifiers, so they cannot collide with a parameter.
                *(
                    (f"header:{h.decode()}", headers.get(h, b"").decode("latin-1"))
                    for h in plan.vary
                ),
            ],
        )
        tags = [t.render_value(params) for t in plan.tags]
        # Directive names are case-insensitive (RFC 9111 5.2): `No-Cache` asks the same.
        bypass = policy.allow_client_bypass and (
            b"no-cache" in headers.get(b"cache-control", b"").lower()
        )
        return await runtime.cache.fetch(
            key, tags, policy, compute, deadline=deadline, bypass=bypass
        )


class _ClientLeaving:
    """Cancels the request's task when its client disconnects, once a fan-out runs in it.

    Hits never start the watcher (no task per hit); a background refresh runs in another task
    and is never cancelled by the client that happened to trigger it.
    """

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.task = asyncio.current_task()
        self.gone = False
        self.watcher: asyncio.Task[None] | None = None

    def watch_if_in_request(self) -> bool:
        """Watch for the client leaving if this runs in the request's task; return whether it
        does (a background refresh runs in another)."""
        if asyncio.current_task() is not self.task:
            return False
        if self.watcher is None:
            self.watcher = asyncio.create_task(self._watch())
        return True

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if self.task is not None:
                    self.task.cancel()
                return

    def absorb(self) -> bool:
        """Return True (and take back the cancellation) when the client has left.

        Every pending cancellation is taken back, not just ours: one may coincide with a timeout
        of a cache operation (which cancels this task too), and with the client gone there is
        nothing left to do but return.
        """
        if not self.gone or self.task is None:
            return False
        while self.task.cancelling():
            self.task.uncancel()
        return True

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


def server_timing(composite: Composite | None, lookup: Lookup) -> bytes:
    """Return a Server-Timing value: one entry per call (duration, or outcome and duration)."""
    if composite is None:
        return f'cache;desc="{lookup.state}"'.encode()
    parts = []
    for name, r in composite.results.items():
        desc = "" if r.outcome == "ok" else f';desc="{r.outcome}"'
        parts.append(f"{name}{desc};dur={r.ms:.1f}")
    return ", ".join(parts).encode()


async def _respond(
    send: Send,
    lookup: Lookup,
    composite: Composite | None,
    if_none_match: bytes | None,
    plan: EndpointPlan,
) -> None:
    entry = lookup.entry
    vary = plan.vary
    body = entry.body
    if lookup.error_stale:
        body = with_stale_age(body, lookup.age_s)
    if entry.status == 200 and entry.complete and not lookup.error_stale:
        # An answer built from who is asking (a forwarded Authorization or Cookie, cached or
        # not, or a cache key varied by one) is for that client's own cache only.
        personal = plan.personal or not PERSONAL_HEADERS.isdisjoint(vary)
        scope = b"private" if personal else b"public"
        cache_control = scope + f", max-age={int(lookup.fresh_for_s)}".encode()
    else:
        cache_control = b"no-store"
    etag = entry.etag.encode() if body is entry.body else b""
    headers = [
        JSON_TYPE,
        (b"x-gateway-complete", b"true" if entry.complete else b"false"),
        (b"x-cache", lookup.state.encode()),
        (b"cache-control", cache_control),
        (b"server-timing", server_timing(composite, lookup)),
    ]
    if vary:
        headers.append((b"vary", b", ".join(vary)))
    if etag:
        headers.append((b"etag", etag))
        if entry.status == 200 and if_none_match is not None and _etag_matches(if_none_match, etag):
            await _send(send, 304, b"", headers[1:])
            return
    await _send(send, entry.status, body, headers)


def _etag_matches(header: bytes, etag: bytes) -> bool:
    if header.strip() == b"*":
        return True
    return any(t.strip().removeprefix(b"W/") == etag for t in header.split(b","))


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    if status != 304:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
