"""The HTTP edge of an endpoint: ASGI request -> typed parameters -> its runner -> bytes out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from starlette.types import Receive, Scope, Send

from gateway.core import context
from gateway.core.context import RequestContext
from gateway.core.runner import JSON_TYPE

if TYPE_CHECKING:
    from gateway.runtime import Runtime


class EndpointHandler:
    """The ASGI app of one endpoint route: request -> typed parameters -> runner -> bytes out.

    It reads the current runtime at each request: a request finishes on the one it started with.
    """

    def __init__(self, current: Callable[[], Runtime], endpoint_id: str) -> None:
        self.current = current
        self.endpoint_id = endpoint_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runner = self.current().runners.get(self.endpoint_id)
        if runner is None:
            await _send(send, 404, orjson.dumps({"detail": "Not Found"}), [JSON_TYPE])
            return
        params, errors = runner.parse(scope)
        if errors:
            await _send(send, 422, orjson.dumps({"detail": errors}), [JSON_TYPE])
            return
        ctx = context.current.get()
        if ctx is None:  # served without the access log (an app mounted on its own)
            ctx = RequestContext("", asyncio.get_running_loop().time(), dict(scope["headers"]))
        leaving = _ClientLeaving(receive)
        ctx.watch = leaving.watch_if_in_request
        try:
            status, headers, body = await runner(ctx, params)
        except asyncio.CancelledError:
            if not leaving.absorb():
                raise
            ctx.disconnected = True
            return  # Nobody is left to answer; the fan-out was cancelled.
        finally:
            leaving.stop()
        await _send(send, status, body, headers)


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


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    if status != 304:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
