"""The misses of one listing's lookups, gathered so that their calls are batched."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from cache.entry import Entry
from cache.lookup import Lookup
from gateway.core.batch import Batch
from gateway.core.context import RequestContext
from gateway.core.executor import Composite
from gateway.core.runner import Runner

GATHER_WINDOW_S = 0.02
"""How long the first miss of a listing waits for the lookups still undecided (a slow cache
read, a wait for another request's fan-out of the same item) before the misses gathered so far
are computed; a miss after that starts a batch of its own."""


class Owner(Protocol):
    """What a gathering reads of its listing: the item endpoint's runner and the batch."""

    item: Runner
    batch: Batch


class Gathering:
    """The misses of one listing's lookups, gathered so that their calls are batched.

    A lookup that misses hands its compute here. The misses are computed together once every
    lookup has either missed or ended (a hit, a stale copy, another request's answer), or
    `GATHER_WINDOW_S` after the first miss, whichever comes first: a miss after that starts a
    batch of its own. A compute asked outside the
    lookup's own task (a background refresh of a stale item) runs on its own, as the item
    endpoint's would.
    """

    def __init__(
        self,
        owner: Owner,
        ctx: RequestContext,
        ids: Sequence[Any],
        ends: float,
        fresh: list[Composite],
    ) -> None:
        self.owner = owner
        self.ctx = ctx
        self.ends = ends
        self.fresh = fresh
        self.tasks: dict[Any, asyncio.Task[Lookup]] = {}
        self.undecided = set(ids)
        self.order = {i: n for n, i in enumerate(ids)}
        self.pending: dict[Any, asyncio.Future[Entry]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.runs: set[asyncio.Task[None]] = set()

    async def fetch(self, i: Any, params: Mapping[str, Any]) -> Lookup:
        item = self.owner.item

        async def compute() -> Entry:
            return await self.compute(i, params)

        try:
            return await item.fetch(self.ctx, params, compute, self.ctx.deadline)
        finally:
            self.decided(i)

    async def compute(self, i: Any, params: Mapping[str, Any]) -> Entry:
        if asyncio.current_task() is not self.tasks.get(i):
            return await self.owner.item.compute(self.ctx, params, [])
        future = asyncio.get_running_loop().create_future()
        self.pending[i] = future
        self.decided(i)
        if self.pending and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(GATHER_WINDOW_S, self.flush)
        return await future

    def decided(self, i: Any) -> None:
        self.undecided.discard(i)
        if not self.undecided and self.pending:
            self.flush()

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        task = asyncio.get_running_loop().create_task(self._run(pending))
        self.runs.add(task)
        task.add_done_callback(self.runs.discard)

    async def _run(self, pending: dict[Any, asyncio.Future[Entry]]) -> None:
        try:
            ids = sorted(pending, key=self.order.__getitem__)  # in the listing's order

            def done(i: Any, entry: Entry) -> None:
                # Each item as soon as it is made: its lookup stores it and lets its followers
                # go without waiting for the batch's slowest item.
                if not pending[i].done():
                    pending[i].set_result(entry)

            entries = await self.owner.batch.run(self.ctx, ids, self.ends, self.fresh, done)
        except Exception as exc:  # a bug: each waiting lookup raises it
            for future in pending.values():
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for future in pending.values():
                future.cancel()
            raise
        for i, future in pending.items():
            if not future.done():
                future.set_result(entries[i])

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for task in list(self.runs):
            task.cancel()
