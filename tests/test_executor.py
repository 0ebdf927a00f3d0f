"""The fan-out and the merge, with fake sources that are plain functions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.config import loader as config
from gateway.core.errors import NotFound, SourceUnavailable
from gateway.core.executor import execute
from gateway.core.merge import answer, encode, error_document, merge, with_stale_age
from gateway.core.plan import EndpointPlan, build_plans
from gateway.core.types import Call, Source
from tests.support import exploding, failing, ok, slow
from upstreams.policies import timeout

CONFIG = """\
version: 1
sources:
  catalog: {kind: sql, dsn: "sqlite:///x.db", timeout_ms: 100}
  pricing: {kind: http, base_url: "http://127.0.0.1:1", timeout_ms: 100}
  stock: {kind: http, base_url: "http://127.0.0.1:2", timeout_ms: 100}
  recs: {kind: http, base_url: "http://127.0.0.1:3", timeout_ms: 100}
endpoints:
  - path: /products/{id:int}
    deadline_ms: 200
    calls:
      product: {source: catalog, query: "SELECT 1 WHERE %(id)s", one: true, required: true}
      price: {source: pricing, path: "/prices/{id}", fallback: {currency: USD, amount: null}}
      stock: {source: stock, path: "/stock/{id}", select: [available], fallback: null}
      recommendations:
        source: recs
        path: /recommendations/{id}
        query: {category: "{product.category}"}
        fallback: omit
"""

Fake = Callable[[Call], Any]


def plan() -> EndpointPlan:
    return build_plans(config.loads(CONFIG, "t.yaml", {}).config)[0]


PRODUCT = {"id": 42, "name": "Lamp", "category": "lighting"}


def healthy(**over: Source) -> dict[str, Source]:
    sources = {
        "catalog": ok(PRODUCT),
        "pricing": ok({"currency": "EUR", "amount": 9.5}),
        "stock": ok({"available": 3, "warehouse": "north"}),
        "recs": ok(lambda call: {"product_ids": [1, 2], "asked": dict(call.params)}),
    }
    sources.update(over)
    return {name: timeout(s) for name, s in sources.items()}


async def test_all_calls_ok_merge_in_declared_order_with_select() -> None:
    p = plan()
    composite = await execute(p, healthy(), {"id": 42})
    assert composite.complete and composite.failed is None
    doc = merge(p, composite)
    assert list(doc) == ["product", "price", "stock", "recommendations", "_meta"]
    assert doc["stock"] == {"available": 3}
    assert doc["recommendations"]["asked"] == {"category": "lighting"}
    assert doc["_meta"] == {"complete": True, "sources": {}}


async def test_dependent_call_waits_only_for_what_it_names() -> None:
    started: dict[str, float] = {}
    ended: dict[str, float] = {}

    def stamp(name: str, seconds: float, data: Any) -> Source:
        async def source(call: Call) -> Any:
            started[name] = time.monotonic()
            await asyncio.sleep(seconds)
            ended[name] = time.monotonic()
            return data

        return source

    composite = await execute(
        plan(),
        healthy(
            catalog=stamp("product", 0.05, PRODUCT),
            pricing=stamp("price", 0.05, {}),
            stock=stamp("stock", 0.05, {}),
            recs=stamp("recs", 0.0, {"product_ids": []}),
        ),
        {"id": 1},
    )
    assert composite.complete
    # By order, not by a clock margin: price and stock ran while product did; recs after it.
    assert started["price"] < ended["product"] and started["stock"] < ended["product"]
    assert started["recs"] >= ended["product"]


async def test_optional_failures_take_fallbacks_and_are_reported() -> None:
    p = plan()
    composite = await execute(
        p,
        healthy(
            pricing=failing(SourceUnavailable("boom", status=503)),
            stock=slow(5, {}),
            recs=failing(NotFound("nope")),
        ),
        {"id": 42},
    )
    assert not composite.complete and composite.failed is None
    doc = merge(p, composite)
    assert doc["price"] == {"currency": "USD", "amount": None}
    assert doc["stock"] is None
    assert "recommendations" not in doc
    assert doc["_meta"] == {
        "complete": False,
        "sources": {"price": "error", "stock": "timeout", "recommendations": "not_found"},
    }


async def test_hung_optional_call_costs_at_most_its_timeout() -> None:
    t0 = time.monotonic()
    composite = await execute(plan(), healthy(stock=slow(30, {})), {"id": 42})
    elapsed = time.monotonic() - t0
    assert composite.results["stock"].outcome == "timeout"
    assert elapsed < 0.5


@pytest.mark.parametrize(
    ("exc", "status", "outcome"),
    [
        (NotFound("no row"), 404, "not_found"),
        (SourceUnavailable("down", connect=True), 502, "error"),
    ],
)
async def test_required_failure_gives_status_and_json_error(
    exc: Exception, status: int, outcome: str
) -> None:
    p = plan()
    composite = await execute(p, healthy(catalog=failing(exc)), {"id": 42})
    assert composite.failed == "product"
    code, doc = error_document(p, composite)
    assert code == status
    assert doc["error"]["call"] == "product" and doc["error"]["outcome"] == outcome


async def test_required_timeout_gives_504() -> None:
    p = plan()
    composite = await execute(p, healthy(catalog=slow(5, PRODUCT)), {"id": 42})
    assert error_document(p, composite)[0] == 504


async def test_call_depending_on_a_failed_call_is_skipped_with_its_fallback() -> None:
    text = CONFIG.replace("required: true", "fallback: null")
    p = build_plans(config.loads(text, "t.yaml", {}).config)[0]
    composite = await execute(p, healthy(catalog=failing(SourceUnavailable("x"))), {"id": 42})
    assert composite.failed is None
    assert composite.results["recommendations"].outcome == "skipped"
    assert "recommendations" not in merge(p, composite)


async def test_a_bug_in_a_source_is_not_dressed_up_as_a_partial_answer() -> None:
    with pytest.raises(BaseExceptionGroup) as info:
        await execute(plan(), healthy(pricing=exploding()), {"id": 42})
    assert info.group_contains(ZeroDivisionError)


async def test_cancelling_the_fan_out_cancels_every_call() -> None:
    cancelled: list[str] = []

    def hang(name: str) -> Source:
        async def source(call: Call) -> Any:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return source

    task = asyncio.create_task(
        execute(
            plan(),
            healthy(catalog=hang("product"), pricing=hang("price"), stock=hang("stock")),
            {"id": 1},
        )
    )
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == ["price", "product", "stock"]


async def test_deadline_is_the_backstop_even_for_a_source_without_timeout() -> None:
    p = plan()
    sources = healthy()
    sources["pricing"] = slow(30, {})  # not wrapped in the timeout policy
    t0 = time.monotonic()
    composite = await execute(p, sources, {"id": 42})
    assert time.monotonic() - t0 < 0.5
    assert composite.results["price"].outcome == "timeout"
    assert composite.failed is None


def test_stale_age_is_spliced_into_meta() -> None:
    body = encode({"a": 1, "_meta": {"complete": True, "sources": {}}})
    assert orjson.loads(with_stale_age(body, 12.5))["_meta"] == {
        "complete": True,
        "sources": {},
        "stale_age_s": 12.5,
    }


def deep(depth: int) -> Any:
    """Return a value nested `depth` levels: orjson decodes up to 1024, encodes up to 255."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_an_encodable_answer_is_encoded_once_and_its_composite_kept() -> None:
    p = plan()
    composite = await execute(p, healthy(), {"id": 42})
    same, status, body = answer(p, composite)
    assert same is composite and status == 200
    assert body == encode(merge(p, composite))


async def test_a_value_too_deep_to_encode_is_that_calls_error_with_its_fallback() -> None:
    p = plan()
    composite = await execute(p, healthy(pricing=ok(deep(300)), recs=ok(deep(256))), {"id": 42})
    answered, status, body = answer(p, composite)
    assert status == 200
    doc = orjson.loads(body)
    assert doc["price"] == {"currency": "USD", "amount": None} and "recommendations" not in doc
    assert doc["product"] == PRODUCT and doc["stock"] == {"available": 3}
    assert doc["_meta"] == {
        "complete": False,
        "sources": {"price": "error", "recommendations": "error"},
    }
    assert answered.results["price"].outcome == "error"
    assert "not encodable" in answered.results["price"].detail
    assert answered.results["product"] is composite.results["product"]
    assert answer(p, await execute(p, healthy(pricing=ok(deep(254))), {"id": 42}))[1] == 200


async def test_a_required_value_too_deep_to_encode_fails_the_answer() -> None:
    p = plan()
    composite = await execute(p, healthy(catalog=ok({**PRODUCT, "x": deep(400)})), {"id": 42})
    answered, status, body = answer(p, composite)
    assert status == 502 and answered.failed == "product"
    assert orjson.loads(body)["error"] == {
        "status": 502,
        "message": "a required source failed",
        "call": "product",
        "outcome": "error",
    }


async def test_select_on_an_upstreams_deeply_nested_lists_is_no_recursion_error() -> None:
    # orjson decodes arrays 1024 deep; `select` keeps fields of the result or of each item of a
    # list (one level), so a hostile upstream's nesting can never exhaust the stack: a 500.
    deep = orjson.loads(b"[" * 1000 + b"]" * 1000)
    items = [{"available": 3, "secret": 1}, 7]
    composite = await execute(plan(), healthy(stock=ok(deep)), {"id": 42})
    assert composite.results["stock"].outcome == "ok"
    assert composite.results["stock"].value == deep
    composite = await execute(plan(), healthy(stock=ok(items)), {"id": 42})
    assert composite.results["stock"].value == [{"available": 3}, 7]
