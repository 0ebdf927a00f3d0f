"""The fan-out: every call of a plan as one task, each waiting only for the calls it names."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cache.directives import Directed, Directives, strictest
from gateway.core.context import RequestContext, explained_calls
from gateway.core.errors import SourceError, reason_of
from gateway.core.plan import CallPlan, EndpointPlan
from gateway.core.templates import Unrenderable
from gateway.core.types import Call, Outcome, Source


# Results are made per call on the hot path: plain slotted dataclasses (a frozen one's
# __init__ costs three times as much), treated as immutable all the same.
@dataclass(slots=True)
class CallResult:
    """What one call produced: its outcome, its value (when ok), how long it took, why it has
    no value (`detail`: a short reason, `HTTP 503`, `connect refused`...), and what its upstream's
    `Cache-Control` allows the composite (`directives`; None when it says nothing or the call
    ignores it)."""

    outcome: Outcome
    value: Any
    ms: float
    detail: str = ""
    directives: Directives | None = None


@dataclass(slots=True)
class Composite:
    """The results of one fan-out, by call name, and the required call that failed, if any."""

    results: Mapping[str, CallResult]
    failed: str | None

    @property
    def complete(self) -> bool:
        return all(r.outcome == "ok" for r in self.results.values())

    @property
    def directives(self) -> Directives | None:
        """Return the strictest `Cache-Control` directives of the calls that answered, if any."""
        return strictest(r.directives for r in self.results.values() if r.outcome == "ok")


class _RequiredFailed(Exception):
    """Raised inside the task group to stop the fan-out once a required call has failed."""


async def execute(
    plan: EndpointPlan,
    sources: Mapping[str, Source],
    params: Mapping[str, Any],
    request: RequestContext | None = None,
    deadline: float | None = None,
) -> Composite:
    """Run every call of `plan` concurrently under its deadline and return what each produced.

    `deadline` (loop time) is the request's, when part of its budget is already spent (the cache
    lookup, a wait for another request's fan-out); by default the plan's deadline from now.
    `request` gives the request id, the client's headers (for the calls' `forward_headers`) and
    the trace context every call carries; when it is explained, each call's start and end.
    Source failures become outcomes; any other exception is a bug and propagates.
    """
    request_id = "" if request is None else request.request_id
    request_headers = None if request is None else request.headers
    trace: tuple[str, str, bool] = ("", "", False)
    if request is not None:
        # Exported: this gateway records the request's span (a client's flag alone is not it).
        exported = request.span is not None and request.flags == "01"
        trace = (request.traceparent(), request.tracestate, exported)
    notes = None if request is None or request.explain is None else explained_calls(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    if deadline is None:
        deadline = start + plan.deadline
    scope: dict[str, Any] = dict(params)
    results: dict[str, CallResult] = {}
    # Only calls that another call waits for need an event (none, in most endpoints).
    done = {name: asyncio.Event() for name in plan.awaited} if plan.awaited else {}

    async def run(cp: CallPlan) -> None:
        note = None
        try:
            for dep in cp.deps:
                await done[dep].wait()
            if notes is not None and request is not None:
                note = notes.setdefault(cp.name, {})
                note["start_ms"] = round((loop.time() - request.arrived) * 1000, 1)
            result = results[cp.name] = await _run_call(
                cp,
                sources[cp.source],
                scope,
                deadline,
                request_id,
                _failed_dep(cp, results) if cp.deps else None,
                request_headers,
                trace,
            )
            if result.outcome == "ok":
                scope[cp.name] = result.value
            elif cp.required:
                raise _RequiredFailed(cp.name)
        finally:
            if note is not None and request is not None:
                note["end_ms"] = round((loop.time() - request.arrived) * 1000, 1)
            if cp.name in done:
                done[cp.name].set()

    failed: str | None = None
    try:
        async with asyncio.timeout_at(deadline):
            async with asyncio.TaskGroup() as tg:
                first, *rest = plan.calls
                for cp in rest:
                    tg.create_task(run(cp), name=cp.task_name)
                # The first call runs in this task, one task fewer per request: the group
                # treats a failure of its body as one of its tasks' (the others are cancelled,
                # the error joins the group), and cancels the body when a task fails.
                await run(first)
    except* _RequiredFailed as group:
        failed = str(group.exceptions[0])
    except* TimeoutError:
        # The endpoint deadline is the backstop: whatever had not ended timed out.
        now_ms = (loop.time() - start) * 1000
        for cp in plan.calls:
            results.setdefault(cp.name, CallResult("timeout", None, now_ms, "deadline"))
        failed = next(
            (cp.name for cp in plan.calls if cp.required and results[cp.name].outcome != "ok"), None
        )
    return Composite({cp.name: results[cp.name] for cp in plan.calls if cp.name in results}, failed)


def _failed_dep(cp: CallPlan, results: Mapping[str, CallResult]) -> str | None:
    return next((d for d in cp.deps if results[d].outcome != "ok"), None)


async def _run_call(
    cp: CallPlan,
    source: Source,
    scope: Mapping[str, Any],
    deadline: float,
    request_id: str,
    skip: str | None,
    request_headers: Mapping[bytes, bytes] | None,
    trace: tuple[str, str, bool],
) -> CallResult:
    if skip is not None:
        return CallResult("skipped", None, 0.0, f"{skip} failed")
    t0 = time.perf_counter()
    try:
        target, args = cp.render(scope)
    except Unrenderable as exc:
        return CallResult("skipped", None, 0.0, str(exc))
    headers: dict[str, str] = {}
    if cp.forward and request_headers:
        headers = {
            name: request_headers[raw].decode("latin-1")
            for raw, name in cp.forward
            if raw in request_headers
        }
    call = Call(
        cp.source,
        cp.name,
        target,
        args,
        cp.timeout,
        deadline,
        cp.one,
        request_id,
        headers,
        cp.max_rows,
        *trace,
    )
    try:
        value = await source(call)
    except SourceError as exc:
        return CallResult(exc.outcome, None, (time.perf_counter() - t0) * 1000, reason_of(exc))
    directives = None
    if type(value) is Directed:
        if not cp.ignore_upstream_cache_control:
            directives = value.directives
        value = value.value
    if cp.select is not None:
        value = _select(value, cp.select)
    if cp.validator is not None and not cp.validator.is_valid(value):
        return CallResult("error", None, (time.perf_counter() - t0) * 1000, "schema")
    return CallResult("ok", value, (time.perf_counter() - t0) * 1000, "", directives)


def _select(value: Any, fields: tuple[str, ...]) -> Any:
    """Keep `fields` of an object, or of each object in a list: one level, never recursing into
    what an upstream nested (orjson decodes 1024 levels; the stack would not hold them)."""
    if isinstance(value, dict):
        return {f: value[f] for f in fields if f in value}
    if isinstance(value, list):
        return [{f: v[f] for f in fields if f in v} if isinstance(v, dict) else v for v in value]
    return value
