"""Traces: W3C trace context read or started and sent to every upstream (always on), and spans
exported (`tracing:`) through the SDK's in-memory exporter and a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

from gateway.config import loader as config
from gateway.core.context import (
    RequestContext,
    begin_trace,
    bounded_tracestate,
    sql_comment,
)
from gateway.core.errors import ConfigError
from gateway.demo.simulator import Simulators, UpstreamServer, json_body, slow
from gateway.ops import tracing
from gateway.ops.log import flush
from tests.serving import product_view_config, product_view_env, serving_config
from tests.support import get

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
TRACING = "tracing: {otlp_endpoint: 'http://127.0.0.1:9', sample_ratio: 1.0}\n"


def ctx_with(**headers: str) -> RequestContext:
    raw = {k.encode(): v.encode() for k, v in headers.items()}
    ctx = RequestContext("r", 0.0, raw)
    begin_trace(ctx)
    return ctx


# --- trace context, parsed -------------------------------------------------------------------


def test_a_valid_client_traceparent_is_continued_with_a_span_of_our_own() -> None:
    ctx = ctx_with(traceparent=CLIENT_PARENT, tracestate="vendor=abc,other=1")
    assert ctx.trace_id == CLIENT_TRACE
    assert ctx.flags == "01"
    assert len(ctx.span_id) == 16 and ctx.span_id != CLIENT_SPAN
    assert ctx.tracestate == "vendor=abc,other=1"
    assert ctx.traceparent() == f"00-{CLIENT_TRACE}-{ctx.span_id}-01"


@pytest.mark.parametrize(
    "bad",
    [
        f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01",  # another version
        f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",  # upper-case hex
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",  # all-zero trace id
        f"00-{CLIENT_TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-1",  # short flags
        f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",
        f"00-{CLIENT_TRACE[:-1]}g-{CLIENT_SPAN}-01",
        "",
    ],
)
def test_a_bad_client_traceparent_starts_a_new_trace_and_drops_tracestate(bad: str) -> None:
    ctx = ctx_with(traceparent=bad, tracestate="vendor=abc")
    assert ctx.trace_id != CLIENT_TRACE and len(ctx.trace_id) == 32
    assert int(ctx.trace_id, 16) != 0
    assert ctx.flags == "00" and ctx.tracestate == ""


def test_without_a_traceparent_a_trace_is_started() -> None:
    one, two = ctx_with(), ctx_with()
    assert len(one.trace_id) == 32 and one.trace_id != two.trace_id
    assert one.traceparent().startswith(f"00-{one.trace_id}-")


def test_tracestate_is_bounded_and_well_formed_or_dropped() -> None:
    assert bounded_tracestate(b"a=1, b=2 ,,c@d=3") == "a=1,b=2,c@d=3"
    assert bounded_tracestate(",".join(f"k{i}=v" for i in range(32)).encode()) != ""
    assert bounded_tracestate(",".join(f"k{i}=v" for i in range(33)).encode()) == ""
    assert bounded_tracestate(b"k=" + b"v" * 255) != ""
    assert bounded_tracestate(b"a=" + b"v" * 200 + b",b=" + b"v" * 200 + b",c=" + b"v" * 200) == ""
    assert bounded_tracestate(b"Upper=1") == ""
    assert bounded_tracestate(b"a=1\r\nX-Evil: 1") == ""
    assert bounded_tracestate("a=é".encode()) == ""


def test_only_a_well_formed_traceparent_reaches_sql_text() -> None:
    good = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert sql_comment(good) == f"/* traceparent='{good}' */ "
    assert sql_comment("00-x' */ DROP TABLE t; --") == ""
    assert sql_comment(good + "*/") == ""


# --- propagation to upstreams, without an exporter -------------------------------------------


def things_config(url: str, extra: str = "") -> config.LoadedConfig:
    text = f"""\
version: 1
cache: {{url: "memory://"}}
{extra}sources:
  flaky: {{kind: http, base_url: "{url}", timeout_ms: 1000,
          retry: {{attempts: 2, backoff_ms: 1, jitter: false, on: [503]}}}}
  tardy: {{kind: http, base_url: "{url}", timeout_ms: 1000, hedge: {{after_ms: 50}}}}
endpoints:
  - path: /things/{{id:int}}
    deadline_ms: 2000
    cache: {{ttl_s: 60}}
    calls:
      a: {{source: flaky, path: "/a/{{id}}"}}
      b: {{source: tardy, path: "/b/{{id}}"}}
"""
    return config.loads(text, "things.yaml", {})


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        server.route("/a/", json_body({"a": 1}))
        server.route("/b/", json_body({"b": 2}))
        yield server


async def test_every_upstream_call_carries_the_clients_trace_and_tracestate(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    async with serving_config(things_config(upstream.url)) as url:
        with capture_logs() as logs:
            status, _, _ = await get(
                http, f"{url}/things/1", traceparent=CLIENT_PARENT, tracestate="vendor=abc"
            )
            flush()
    assert status == 200
    assert len(upstream.seen) == 2
    for seen in upstream.seen:
        version, trace, span, flags = seen.headers["traceparent"].split("-")
        assert (version, trace, flags) == ("00", CLIENT_TRACE, "01")
        assert span != CLIENT_SPAN and len(span) == 16
        assert seen.headers["tracestate"] == "vendor=abc"
    access = [e for e in logs if e.get("event") == "request"]
    assert access and access[0]["trace_id"] == CLIENT_TRACE


async def test_a_bad_client_traceparent_is_replaced_before_any_upstream_sees_it(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    bad = f"00-{CLIENT_TRACE}-{'0' * 16}-01"
    async with serving_config(things_config(upstream.url)) as url:
        await get(http, f"{url}/things/1", traceparent=bad, tracestate="vendor=abc")
        await get(http, f"{url}/things/2", tracestate="k=" + "v" * 250 + ",j=" + "v" * 300)
    sent = [s.headers["traceparent"] for s in upstream.seen]
    assert len(sent) == 4
    for value in sent:
        _, trace, span, _ = value.split("-")
        assert trace != CLIENT_TRACE and int(trace, 16) != 0 and int(span, 16) != 0
    assert all("tracestate" not in s.headers for s in upstream.seen)


# --- export: spans -------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    token = tracing.exporter_for.set(lambda cfg: exporter)
    try:
        yield exporter
    finally:
        tracing.exporter_for.reset(token)


def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def attr(span: ReadableSpan, key: str) -> Any:
    assert span.attributes is not None
    return span.attributes[key]


def named(found: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in found if s.name.startswith(prefix)]


async def test_a_product_view_is_a_request_span_with_five_call_spans(
    sims: Simulators,
    catalog_dsn: str,
    redis_url: str,
    redis_prefix: str,
    spans: InMemorySpanExporter,
    http: aiohttp.ClientSession,
) -> None:
    env = product_view_env(sims, catalog_dsn, redis_url)
    loaded = product_view_config(env, redis_prefix, {"version: 1\n": "version: 1\n" + TRACING})
    async with serving_config(loaded) as url:
        status, headers, _ = await get(http, f"{url}/products/7", traceparent=CLIENT_PARENT)
        assert status == 200 and headers["x-cache"] == "MISS"
    # The app's shutdown flushed the batch processor.
    found = finished(spans)
    (request,) = named(found, "GET /products/")
    assert request.context.trace_id == int(CLIENT_TRACE, 16)
    assert request.parent is not None and request.parent.span_id == int(CLIENT_SPAN, 16)
    assert attr(request, "http.response.status_code") == 200
    assert attr(request, "gateway.cache") == "MISS"
    calls = named(found, "call ")
    assert sorted(attr(s, "gateway.call") for s in calls) == [
        "price",
        "product",
        "recommendations",
        "reviews",
        "stock",
    ]
    for span in calls:
        assert span.parent is not None and span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        assert attr(span, "gateway.outcome") == "ok"
        assert attr(span, "gateway.attempt") == 1
        assert attr(span, "gateway.hedge") is False
    (lookup,) = named(found, "cache lookup")
    assert attr(lookup, "gateway.cache.state") == "MISS"
    assert attr(lookup, "gateway.cache.tier") == "redis"
    assert lookup.parent is not None and lookup.parent.span_id == request.context.span_id
    assert len(named(found, "cache store")) == 1


async def test_a_retry_is_two_attempt_spans_and_a_hedge_is_marked(
    upstream: UpstreamServer, spans: InMemorySpanExporter, http: aiohttp.ClientSession
) -> None:
    asked = {"a": 0}

    async def fail_once(request: web.BaseRequest) -> web.StreamResponse:
        asked["a"] += 1
        if asked["a"] == 1:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"a": 1})

    upstream.route("/a/", fail_once)
    first = {"b": True}

    async def late_once(request: web.BaseRequest) -> web.StreamResponse:
        if first["b"]:
            first["b"] = False
            return await slow(0.5, json_body({"b": 2}))(request)
        return web.json_response({"b": 2})

    upstream.route("/b/", late_once)
    async with serving_config(things_config(upstream.url, TRACING)) as url:
        status, _, _ = await get(http, f"{url}/things/1")
        assert status == 200
    found = finished(spans)
    a = sorted(named(found, "call a"), key=lambda s: attr(s, "gateway.attempt"))
    assert [attr(s, "gateway.attempt") for s in a] == [1, 2]
    assert [attr(s, "gateway.outcome") for s in a] == ["error", "ok"]
    assert attr(a[0], "gateway.reason") == "HTTP 503"
    b = named(found, "call b")
    assert sorted(attr(s, "gateway.hedge") for s in b) == [False, True]
    assert {attr(s, "gateway.outcome") for s in b} == {"ok", "cancelled"}
    # Each attempt told its upstream its own span id.
    sent = {s.headers["traceparent"].split("-")[2] for s in upstream.seen}
    assert {f"{s.context.span_id:016x}" for s in a + b} == sent


async def test_an_unsampled_trace_exports_nothing_and_still_propagates(
    upstream: UpstreamServer, spans: InMemorySpanExporter, http: aiohttp.ClientSession
) -> None:
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    async with serving_config(things_config(upstream.url, TRACING)) as url:
        await get(http, f"{url}/things/1", traceparent=unsampled)
    assert finished(spans) == []
    assert {s.headers["traceparent"].split("-")[1] for s in upstream.seen} == {CLIENT_TRACE}
    assert {s.headers["traceparent"][-2:] for s in upstream.seen} == {"00"}


# --- export: a real OTLP/HTTP receiver --------------------------------------------------------


Exported = trace_service_pb2.ExportTraceServiceRequest


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[
    tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]]
]:
    got: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def export(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        got.append(message)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", got
    finally:
        await runner.cleanup()


async def test_spans_reach_a_real_otlp_http_receiver_as_protobuf(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    async with otlp_receiver() as (endpoint, got):
        extra = f"tracing: {{otlp_endpoint: '{endpoint}', sample_ratio: 1.0, service_name: gw}}\n"
        async with serving_config(things_config(upstream.url, extra)) as url:
            await get(http, f"{url}/things/1", traceparent=CLIENT_PARENT)
        # The app's shutdown exported the batch (in a thread, while this loop served it).
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
    names, services, traces = set(), set(), set()
    for message in got:
        for resource_spans in message.resource_spans:
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.name":
                    services.add(attr.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    names.add(span.name)
                    traces.add(span.trace_id.hex())
    assert {"GET /things/{id:int}", "call a", "call b", "cache lookup"} <= names
    assert services == {"gw"} and traces == {CLIENT_TRACE}


# --- config -------------------------------------------------------------------------------


def test_tracing_config_is_checked_with_its_line() -> None:
    with pytest.raises(ConfigError) as exc:
        things_config(
            "http://127.0.0.1:1", "tracing: {otlp_endpoint: 'ftp://x', sample_ratio: 2}\n"
        )
    text = "\n".join(str(p) for p in exc.value.problems)
    assert "things.yaml:3" in text and "otlp_endpoint" in text and "sample_ratio" in text


def test_tracing_without_the_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import schema

    monkeypatch.setattr(schema, "OTEL_PACKAGES", ("opentelemetry.sdk.no_such_module",))
    with pytest.raises(ConfigError) as exc:
        things_config("http://127.0.0.1:1", TRACING)
    (problem,) = exc.value.problems
    assert "things.yaml:3" in str(problem) and "pip install '.[otel]'" in str(problem)
