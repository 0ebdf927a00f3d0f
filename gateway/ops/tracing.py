"""Exported traces (`tracing:` in gateway.yaml): spans per request, call attempt and cache
operation, through the OpenTelemetry SDK and its OTLP/HTTP exporter (the optional `otel` extra).

The W3C trace context itself (read from the client or started, sent to every upstream) needs
none of this and is always on: `gateway.core.context`. This module is only imported when a
config asks for export, and the policies it adds are only installed then: off costs nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from gateway.core.context import RequestContext
from gateway.core.errors import CircuitOpen, SourceError, reason_of
from gateway.core.types import JSON, Call, Policy, Source

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from gateway.config.schema import TracingConfig

EXPORT_TIMEOUT_S = 5.0
"""How long one OTLP export may take: the bound on a shutdown's last flush, too."""

ExporterFor = Callable[["TracingConfig"], "SpanExporter"]


def otlp_exporter(cfg: TracingConfig) -> SpanExporter:
    """Return the OTLP/HTTP (protobuf) exporter to `cfg.otlp_endpoint`'s `/v1/traces`."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = cfg.otlp_endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)


exporter_for: ContextVar[ExporterFor] = ContextVar("exporter_for", default=otlp_exporter)
"""How a runtime makes its exporter from `tracing:`; tests set the SDK's in-memory one."""


class _Attempts:
    """One call's attempts so far: how many were started (hedges not counted) and how many run."""

    __slots__ = ("number", "running")

    def __init__(self) -> None:
        self.number = 0
        self.running = 0


_attempts: ContextVar[_Attempts | None] = ContextVar("gateway_attempts", default=None)


def _ns_ago(seconds: float) -> int:
    return time.time_ns() - int(seconds * 1e9)


class Tracing:
    """An SDK tracer provider for one runtime: ratio sampling (parent-based: a client's sampled
    flag decides for its traces), a batch processor, and the spans the gateway makes."""

    def __init__(self, cfg: TracingConfig, exporter: SpanExporter | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        self.cfg = cfg
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        self.exporter = exporter if exporter is not None else exporter_for.get()(cfg)
        self.provider.add_span_processor(
            BatchSpanProcessor(self.exporter, export_timeout_millis=EXPORT_TIMEOUT_S * 1000)
        )
        self.tracer = self.provider.get_tracer("gateway")
        self._trace = trace
        self._span_context = SpanContext
        self._non_recording = NonRecordingSpan
        self._flags = TraceFlags
        self._state = TraceState
        self._server, self._client, self._internal = (
            SpanKind.SERVER,
            SpanKind.CLIENT,
            SpanKind.INTERNAL,
        )
        self._error = Status(StatusCode.ERROR)

    # --- the request's span -----------------------------------------------------------------

    def begin(self, ctx: RequestContext, parent_id: str, name: str) -> None:
        """Start the request's span (from its arrival) as a child of the client's span
        `parent_id` (or as a root), and make the request's trace context name it."""
        parent = None
        if parent_id:
            state = self._state.from_header([ctx.tracestate]) if ctx.tracestate else None
            remote = self._span_context(
                int(ctx.trace_id, 16),
                int(parent_id, 16),
                is_remote=True,
                trace_flags=self._flags(int(ctx.flags, 16)),
                trace_state=state,
            )
            parent = self._trace.set_span_in_context(self._non_recording(remote))
        loop = asyncio.get_running_loop()
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=self._server,
            start_time=_ns_ago(loop.time() - ctx.arrived),
            attributes={"gateway.endpoint": ctx.endpoint, "gateway.request_id": ctx.request_id},
        )
        ctx.span = span
        sc = span.get_span_context()
        ctx.trace_id = f"{sc.trace_id:032x}"
        ctx.span_id = f"{sc.span_id:016x}"
        ctx.flags = "01" if sc.trace_flags.sampled else "00"

    def end(self, ctx: RequestContext, status: int | None) -> None:
        """End the request's span with its status and cache state."""
        span = ctx.span
        if span is None:
            return
        if span.is_recording():
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(self._error)
            span.set_attribute("gateway.cache", ctx.cache or "")
            if ctx.complete is not None:
                span.set_attribute("gateway.complete", ctx.complete)
        span.end()

    def cache_span(
        self,
        ctx: RequestContext,
        operation: str,
        started: float,
        ended: float,
        attributes: Mapping[str, Any],
    ) -> None:
        """Record one cache operation (`lookup`, `store`) between two loop times, under the
        request's span."""
        if ctx.span is None or not ctx.span.is_recording():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        span = self.tracer.start_span(
            f"cache {operation}",
            context=self._trace.set_span_in_context(ctx.span),
            kind=self._internal,
            start_time=_ns_ago(now - started),
            attributes={"gateway.cache.operation": operation, **attributes},
        )
        span.end(end_time=_ns_ago(now - ended))

    # --- the call attempts' spans, as policies in the guard chain ----------------------------

    def policies(self) -> tuple[Policy, Policy]:
        """Return (outermost, per attempt): the policies `plan.guard` installs around a source
        and around each of its attempts (hedges included)."""
        return self._call, self._attempt

    def _call(self, source: Source) -> Source:
        async def call_scope(call: Call) -> JSON:
            state = _Attempts()
            token = _attempts.set(state)
            try:
                return await source(call)
            except CircuitOpen as exc:
                if state.number == 0:  # refused before any attempt: still one span says so
                    self._record_refusal(call, exc)
                raise
            finally:
                _attempts.reset(token)

        return call_scope

    def _attempt(self, source: Source) -> Source:
        async def attempt(call: Call) -> JSON:
            state = _attempts.get()
            if state is None:
                state = _Attempts()
            hedge = state.running > 0  # retries run one after another; a hedge overlaps
            if not hedge:
                state.number += 1
            state.running += 1
            span = self._start_attempt(call, state.number, hedge)
            outcome = "cancelled"
            try:
                if span is not None:
                    sc = span.get_span_context()
                    trace = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-01"
                    call = dataclasses.replace(call, trace=trace)
                value = await source(call)
                outcome = "ok"
                return value
            except SourceError as exc:
                outcome = exc.outcome
                if span is not None:
                    span.set_attribute("gateway.reason", reason_of(exc))
                    span.set_status(self._error)
                raise
            finally:
                state.running -= 1
                if span is not None:
                    span.set_attribute("gateway.outcome", outcome)
                    span.end()

        return attempt

    def _parent(self, call: Call) -> Any:
        # The request's span, as the call's traceparent names it: `00-trace-span-flags`.
        if len(call.trace) != 55:
            return None
        sc = self._span_context(
            int(call.trace[3:35], 16),
            int(call.trace[36:52], 16),
            is_remote=False,
            trace_flags=self._flags(int(call.trace[53:], 16)),
        )
        return self._trace.set_span_in_context(self._non_recording(sc))

    def _start_attempt(self, call: Call, number: int, hedge: bool) -> Any:
        span = self.tracer.start_span(
            f"call {call.name}",
            context=self._parent(call),
            kind=self._client,
            attributes={
                "gateway.source": call.source,
                "gateway.call": call.name,
                "gateway.attempt": number,
                "gateway.hedge": hedge,
            },
        )
        if not span.is_recording():
            return None
        return span

    def _record_refusal(self, call: Call, exc: SourceError) -> None:
        span = self._start_attempt(call, 0, False)
        if span is not None:
            span.set_attribute("gateway.outcome", exc.outcome)
            span.set_attribute("gateway.reason", reason_of(exc))
            span.set_status(self._error)
            span.end()

    # --- lifetime ---------------------------------------------------------------------------

    def flush(self, timeout_s: float = EXPORT_TIMEOUT_S) -> bool:
        """Export every span ended so far; return False if that took longer than `timeout_s`."""
        return self.provider.force_flush(int(timeout_s * 1000))

    async def shutdown(self) -> None:
        """Export what is left and stop the processor's thread (off the event loop)."""
        await asyncio.to_thread(self.provider.shutdown)


def tracing_for(cfg: TracingConfig | None, previous: Tracing | None = None) -> Tracing | None:
    """Return the tracing a config asks for: `previous`'s when its settings did not change."""
    if cfg is None:
        return None
    if previous is not None and previous.cfg == cfg:
        return previous
    return Tracing(cfg)
