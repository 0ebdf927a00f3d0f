"""Computing many items of one item endpoint together: each item runs the item endpoint's own
fan-out (`execute`), except that its calls that declare `batch` ask a shared `_Group`, which
sends one upstream request per chunk of `max` items once every item has asked (or ended).

So dependent calls wait per item, fallbacks and required calls apply per item, and a batch
request goes through its source's policies (timeout, retry, hedge, breaker) like any call: when
it fails, it fails that call for each of its items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from cache.directives import Directed
from cache.entry import Entry
from gateway.core.context import RequestContext
from gateway.core.errors import BadPayload, NotFound, Unsendable
from gateway.core.executor import Composite, execute
from gateway.core.plan import CallPlan, EndpointPlan
from gateway.core.runner import Observe, finish
from gateway.core.templates import scalar_text
from gateway.core.types import JSON, Call, Source

BATCHED = "batch:"
"""Prefix of the stand-in source names of batched calls (source names are never so spelt)."""


def _unrendered(scope: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """A batched call's per-item request is never sent: nothing of it is rendered."""
    return "", {}


class Batch:
    """The item endpoint's plan with its batchable calls answered by groups, ready to run."""

    def __init__(self, plan: EndpointPlan, sources: Mapping[str, Source], observe: Observe) -> None:
        self.plan = plan
        self.sources = sources
        self.observe = observe
        self.batched = tuple(cp for cp in plan.calls if cp.batch is not None)
        self.stand_in = replace(
            plan,
            calls=tuple(
                replace(cp, source=BATCHED + cp.name, render=_unrendered)
                if cp.batch is not None
                else cp
                for cp in plan.calls
            ),
        )
        self.name = plan.params[0].name

    async def run(
        self,
        ctx: RequestContext,
        ids: Sequence[Any],
        ends: float,
        fresh: list[Composite],
        done: Callable[[Any, Entry], None] | None = None,
    ) -> dict[Any, Entry]:
        """Compute the entries of `ids` (distinct) by `ends` (loop time, capped at the item
        endpoint's own deadline from now); `fresh` gets each item's composite, and `done` each
        entry as soon as it is made. Every call without `batch` runs per item, bounded by its
        source's bulkhead; every batched call, once per chunk."""
        plan = self.plan
        ends = min(ends, asyncio.get_running_loop().time() + plan.deadline - plan.cache_reserve)
        groups = {cp.name: _Group(cp, self.sources[cp.source], ids) for cp in self.batched}
        entries: dict[Any, Entry] = {}

        async def item(i: Any) -> None:
            entry = entries[i] = await self._item(ctx, i, groups, ends, fresh)
            if done is not None:
                done(i, entry)

        try:
            async with asyncio.TaskGroup() as tg:
                for i in ids:
                    tg.create_task(item(i))
        finally:
            for group in groups.values():
                group.stop()
        return entries

    async def _item(
        self,
        ctx: RequestContext,
        i: Any,
        groups: Mapping[str, _Group],
        ends: float,
        fresh: list[Composite],
    ) -> Entry:
        sources = dict(self.sources)
        for name, group in groups.items():
            sources[BATCHED + name] = partial(group.ask, i)
        try:
            composite = await execute(self.stand_in, sources, {self.name: i}, ctx, ends)
        finally:
            for group in groups.values():
                group.ended(i)
        return finish(self.plan, composite, fresh, self.observe)


class _Group:
    """One batched call for the items of one batch: it sends its requests once every item has
    asked for its value or ended without asking (its fan-out stopped early)."""

    def __init__(self, cp: CallPlan, source: Source, ids: Sequence[Any]) -> None:
        assert cp.batch is not None
        self.cp = cp
        self.batch = cp.batch
        self.source = source
        self.ids = ids
        self.waiting = set(ids)
        self.asked: dict[Any, asyncio.Future[JSON]] = {}
        self.call: Call | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def ask(self, i: Any, call: Call) -> JSON:
        """Return item `i`'s value (or raise its call's `SourceError`) once the batch answers."""
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self.asked[i] = future
        if self.call is None:
            self.call = call
        self.ended(i)
        return await future

    def ended(self, i: Any) -> None:
        """Item `i` asked, or will not: send once no item is left that may still ask."""
        waiting = self.waiting
        if i not in waiting:
            return
        waiting.discard(i)
        if waiting or not self.asked:
            return
        ids = [i for i in self.ids if i in self.asked]  # in the listing's order
        size = self.batch.max
        loop = asyncio.get_running_loop()
        for start in range(0, len(ids), size):
            task = loop.create_task(self._send(ids[start : start + size]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, chunk: list[Any]) -> None:
        assert self.call is not None
        cp = self.cp
        target, params = self.batch.render(chunk)
        call = replace(
            self.call,
            source=cp.source,
            target=target,
            params=params,
            one=False,
            timeout=self.batch.timeout or self.call.timeout,
            # max_rows bounds one item's rows: a chunk's answer holds up to that many per item
            max_rows=self.call.max_rows * len(chunk),
        )
        directives = None
        try:
            value = await self.source(call)
            if type(value) is Directed:
                # The batch answer's Cache-Control binds each item's value it holds.
                value, directives = value.value, value.directives
            values = self._match(value, chunk)
        except Unsendable:
            if len(chunk) > 1:
                # One id the driver cannot bind (an int past the column's range on PostgreSQL)
                # must not cost the others theirs: halve the chunk until it is alone.
                half = len(chunk) // 2
                await asyncio.gather(self._send(chunk[:half]), self._send(chunk[half:]))
                return
            self._fail(chunk, Unsendable(f"{cp.name}: the driver cannot bind {chunk[0]!r}"))
            return
        except Exception as exc:  # a source's failure, or a bug: each item's call raises it
            self._fail(chunk, exc)
            return
        for i in chunk:
            future = self.asked[i]
            if future.done():
                continue
            if i in values:
                found = values[i]
                future.set_result(found if directives is None else Directed(found, directives))
            else:
                future.set_exception(NotFound(f"{cp.name}: no element with {self.batch.key}={i}"))

    def _fail(self, chunk: list[Any], exc: Exception) -> None:
        for i in chunk:
            future = self.asked[i]
            if not future.done():
                future.set_exception(exc)

    def _match(self, value: JSON, chunk: list[Any]) -> dict[Any, JSON]:
        """Return each item's value: its element (the first one), or with `rows`, the list of
        its rows. An element whose key names no item of the chunk is ignored."""
        if not isinstance(value, list):
            raise BadPayload(f"{self.cp.name}: a batch answer must be a JSON array")
        key = self.batch.key
        wanted = {scalar_text(i): i for i in chunk}
        rows = self.batch.rows
        out: dict[Any, Any] = {i: [] for i in chunk} if rows else {}
        for element in value:
            if not isinstance(element, dict):
                continue
            k = element.get(key)
            if k is None or isinstance(k, dict | list):
                continue
            i = wanted.get(scalar_text(k))
            if i is None:
                continue
            if rows:
                out[i].append(element)
            elif i not in out:
                out[i] = element
        return out

    def stop(self) -> None:
        """Cancel requests still running: no item is left to read them."""
        for task in list(self.tasks):
            task.cancel()
