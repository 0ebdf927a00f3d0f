"""Listings: one item document per id, each built and cached exactly as its item endpoint builds
and caches it, the calls of the items that miss batched into as few upstream requests as the
sources allow (`gateway.core.batch`).

A listing's answer is `{"items": [item | null, ...], "_meta": {"complete", "items"}}` in the
order the ids were asked; the item documents are the cached entries' bytes, joined, never
decoded or encoded again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.types import Scope

from cache.entry import etag_of
from cache.lookup import Lookup
from gateway.core.batch import Batch
from gateway.core.context import RequestContext
from gateway.core.executor import CallResult, Composite, execute
from gateway.core.gathering import Gathering
from gateway.core.merge import answer, with_stale_age
from gateway.core.plan import EndpointPlan
from gateway.core.runner import (
    JSON_TYPE,
    Observe,
    Reply,
    Runner,
    etag_matches,
    parse_params,
    parse_value,
)
from gateway.core.seeing import no_store, with_explain
from gateway.core.types import Source

IDS = "*ids"
"""The parameters' key of the ids parsed from the query (no path parameter can be named so)."""

REASON_OF_STATUS = {404: "not_found", 504: "timeout"}
"""What an item's error status says in `_meta.items`; any other error is `error`."""


@dataclass(slots=True)
class _Ids:
    """The ids a listing's call found, in its order: each parsed (None where a value is no valid
    id), its text for `_meta.items`, and how many were past `max` (not fetched)."""

    ids: list[Any]
    keys: list[str]
    dropped: int


class ListRunner:
    """One listing endpoint, compiled when the config loads, around its item endpoint's runner."""

    def __init__(
        self,
        plan: EndpointPlan,
        item: Runner,
        sources: Mapping[str, Source],
        observe: Observe,
    ) -> None:
        assert plan.listing is not None
        self.plan = plan
        self.listing = plan.listing
        self.item = item
        self.sources = sources
        self.observe = observe
        self.id_param = item.plan.params[0]
        self.batch = Batch(item.plan, sources, observe)

    def parse(self, scope: Scope) -> tuple[dict[str, Any], list[Any]]:
        """Return the typed path parameters and ids, or their validation errors (a 422)."""
        params, errors = parse_params(self.plan, scope.get("path_params", {}))
        name = self.listing.query
        if name is None:
            return params, errors
        values = [
            v
            for k, v in parse_qsl(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            )
            if k == name
        ]
        if not values:
            missing = {"type": "missing", "loc": ["query", name], "msg": "Field required"}
            return params, [*errors, {**missing, "input": None}]
        count = sum(v.count(",") + 1 for v in values if v)
        if count > self.listing.max:
            too_long = {
                "type": "too_long",
                "loc": ["query", name],
                "msg": f"List should have at most {self.listing.max} items, not {count}",
                "input": ",".join(values)[:200],
            }
            return params, [*errors, too_long]
        ids = []
        for n, text in enumerate(t for v in values if v for t in v.split(",")):
            value, problems = parse_value(self.id_param, text, ["query", name, n])
            errors += problems
            ids.append(value)
        params[IDS] = ids
        return params, errors

    async def __call__(self, ctx: RequestContext, params: Mapping[str, Any]) -> Reply:
        """Answer one listing: its ids, each item from the cache or computed with the others."""
        ctx.endpoint = self.plan.id
        return await self.item.seeing.serve(ctx, params, self.answer)

    async def answer(self, ctx: RequestContext, params: Mapping[str, Any]) -> Reply:
        """Return the listing's answer, `_explain` in it when `ctx` is explained."""
        plan = self.plan
        ctx.deadline = ctx.arrived + plan.deadline
        dropped = 0
        # A client that leaves cancels the listing (its ids call, and the batches it started).
        ctx.watch()
        if self.listing.call is None:
            ids: list[Any] = params[IDS]
            keys = [str(i) for i in ids]
        else:
            got = await self._ids_from_call(ctx, params)
            if not isinstance(got, _Ids):
                return got  # the ids call's error answer
            ids, keys, dropped = got.ids, got.keys, got.dropped
        unique = list(dict.fromkeys(i for i in ids if i is not None))
        fresh: list[Composite] = []
        lookups = await self._lookups(ctx, unique, fresh)
        _account(ctx, fresh)
        return self._reply(ctx, ids, keys, lookups, dropped)

    async def _ids_from_call(self, ctx: RequestContext, params: Mapping[str, Any]) -> _Ids | Reply:
        """Run the listing's own calls; return its ids, or the error answer when the ids call
        failed (or answered no list of ids)."""
        assert self.listing.call is not None and self.listing.field is not None
        call, field = self.listing.call, self.listing.field
        composite = await execute(self.plan, self.sources, params, ctx, ctx.deadline)
        value = composite.results[call].value if call in composite.results else None
        if isinstance(value, Mapping) and isinstance(value.get(field), list):
            raw = value[field]
        elif isinstance(value, list):
            raw = [v.get(field) if isinstance(v, Mapping) else None for v in value]
        else:
            raw = None
        if raw is None and call in composite.results and composite.results[call].outcome == "ok":
            # An answer that holds no list of ids is the ids call's error, never an empty page.
            results = dict(composite.results)
            results[call] = CallResult("error", None, results[call].ms, "no list of ids")
            composite = Composite(results, None)
        if composite.failed is None and composite.results[call].outcome != "ok":
            # Without its ids a listing has nothing to show: the ids call is always required.
            composite = Composite(composite.results, call)
        self.observe(self.plan, composite)
        composite, status, body = answer(self.plan, composite)
        if status != 200 or raw is None:
            headers = [
                JSON_TYPE,
                (b"x-gateway-complete", b"false"),
                (b"cache-control", b"no-store"),
            ]
            return status, headers, body
        got = _Ids([], [], max(0, len(raw) - self.listing.max))
        for v in raw[: self.listing.max]:
            if isinstance(v, str | int | float) and not isinstance(v, bool):
                text = v if isinstance(v, str) else orjson.dumps(v).decode()
                parsed, problems = parse_value(self.id_param, text, [])
                got.ids.append(None if problems else parsed)
                # A valid id is its own key (at most MAX_SEGMENT characters); an upstream's
                # invalid one is cut, as any other non-id value is.
                got.keys.append(text[:100] if problems else text)
            else:  # no id at all: its place says so
                got.ids.append(None)
                got.keys.append(orjson.dumps(v).decode()[:100])
        return got

    async def _lookups(
        self, ctx: RequestContext, ids: Sequence[Any], fresh: list[Composite]
    ) -> dict[Any, Lookup]:
        """Return each item's answer: looked up under its item endpoint's key, the misses
        computed together."""
        item = self.item
        ends = ctx.deadline - item.reserve
        name = self.id_param.name
        if item.policy is None:
            entries = await self.batch.run(ctx, ids, ends, fresh)
            return {i: Lookup(entries[i], "BYPASS", 0.0, 0.0, False) for i in ids}
        gathering = Gathering(self, ctx, ids, ends, fresh)
        try:
            async with asyncio.TaskGroup() as tg:
                for i in ids:
                    gathering.tasks[i] = tg.create_task(gathering.fetch(i, {name: i}))
        finally:
            gathering.stop()
        return {i: t.result() for i, t in gathering.tasks.items()}

    def _reply(
        self,
        ctx: RequestContext,
        ids: Sequence[Any],
        keys: Sequence[str],
        lookups: Mapping[Any, Lookup],
        dropped: int,
    ) -> Reply:
        parts = [b'{"items":[']
        reasons: dict[str, str] = {}
        fresh_for = float("inf")
        cacheable = True
        for n, (i, key) in enumerate(zip(ids, keys, strict=True)):
            if n:
                parts.append(b",")
            lookup = lookups.get(i) if i is not None else None
            if lookup is None:
                parts.append(b"null")
                reasons[key] = "error"
                continue
            entry = lookup.entry
            if entry.status != 200:
                parts.append(b"null")
                reasons[key] = REASON_OF_STATUS.get(entry.status, "error")
                continue
            if lookup.error_stale:
                parts.append(with_stale_age(entry.body, lookup.age_s))
                cacheable = False
            else:
                parts.append(entry.body)
            if not entry.complete:
                reasons[key] = "partial"
            if not entry.shared:  # an upstream said no-store or private for this item
                cacheable = False
            fresh_for = min(fresh_for, lookup.fresh_for_s)
        complete = not reasons and not dropped
        meta: dict[str, Any] = {"complete": complete, "items": reasons}
        if dropped:
            meta["dropped"] = dropped
        parts.append(b'],"_meta":' + orjson.dumps(meta) + b"}")
        body = b"".join(parts)
        ctx.complete = complete
        item = self.item
        if complete and cacheable and fresh_for != float("inf"):
            cache_control = item.cache_scope + str(int(fresh_for)).encode()
        else:
            cache_control = b"no-store"
        states = [lk.state for lk in lookups.values()]
        state = next((s for s in ("MISS", "STALE", "BYPASS") if s in states), "HIT")
        if not states:
            state = "BYPASS"  # no item: nothing was looked up
        ctx.cache = state
        counts = ", ".join(f"{s} {states.count(s)}" for s in dict.fromkeys(states)) or "none"
        etag = etag_of(body).encode()
        headers = [
            JSON_TYPE,
            (b"x-gateway-complete", b"true" if complete else b"false"),
            (b"x-cache", state.encode()),
            (b"cache-control", cache_control),
            (b"server-timing", f'items;desc="{counts}"'.encode()),
            (b"etag", etag),
        ]
        if item.vary:
            headers.append((b"vary", item.vary))
        if ctx.explain is not None:
            explain = self._explain(ctx, ids, lookups)
            return 200, no_store(headers), with_explain(body, explain)
        inm = ctx.headers.get(b"if-none-match")
        if inm is not None and etag_matches(inm, etag):
            return 304, headers[1:], b""
        return 200, headers, body

    def _explain(
        self, ctx: RequestContext, ids: Sequence[Any], lookups: Mapping[Any, Lookup]
    ) -> dict[str, Any]:
        """Return a listing's `_explain`: its budget, and per item its cache key and state."""
        item, name = self.item, self.id_param.name
        items = []
        for i in ids:
            lookup = lookups.get(i) if i is not None else None
            if lookup is None:
                items.append({"id": i, "key": None, "state": None})
                continue
            items.append(
                {
                    "id": i,
                    "key": item.key(ctx, {name: i}) if item.policy is not None else None,
                    "state": lookup.state,
                    "age_s": round(lookup.age_s, 3),
                }
            )
        spent = round((asyncio.get_running_loop().time() - ctx.arrived) * 1000, 1)
        return {
            "budget": {"deadline_ms": round(self.plan.deadline * 1000, 1), "spent_ms": spent},
            "trace_id": ctx.trace_id,
            "items": items,
        }


def _account(ctx: RequestContext, fresh: Sequence[Composite]) -> None:
    """Count the outcomes of the items' calls computed for the listing, per call, for the access
    line (`{"price": {"ok": 23, "timeout": 1}}`)."""
    calls: dict[str, dict[str, int]] = {}
    for composite in fresh:
        for name, result in composite.results.items():
            counts = calls.setdefault(name, {})
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
    ctx.calls = calls
