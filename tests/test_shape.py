"""`shape`: the document declared field by field from dotted paths into the calls' results."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import loader as config
from gateway.core.executor import CallResult, Composite
from gateway.core.merge import answer
from gateway.core.plan import build_plans
from tests.config_files import config_text, problems
from tests.serving import serving_config

BASE = """\
version: 1
sources:
  catalog: {kind: sql, dsn: "sqlite:///tmp/x.db", timeout_ms: 100}
  pricing: {kind: http, base_url: "http://127.0.0.1:9101", timeout_ms: 100}
endpoints:
  - path: /products/{id:int}
    calls:
      product: {source: catalog, query: "SELECT * FROM p WHERE id = %(id)s", one: true,
                required: true}
      price: {source: pricing, path: "/prices/{id}", fallback: {currency: USD, amount: null}}
      stock: {source: pricing, path: "/stock/{id}", select: [available], fallback: omit}
      reviews: {source: pricing, path: "/reviews/{id}", fallback: null}
    shape:  # the shape
      id: product.id
      title: product.name
      price: {from: price.amount, default: null}
      currency: {from: price.currency, default: EUR}
      in_stock: stock.available  # in stock
      first_review: reviews.items.0.text
      first_rating: {from: reviews.items.0.rating, default: 0}
"""


def plan_of(text: str = BASE) -> Any:
    return build_plans(config.loads(text, "gw.yaml", {}).config)[0]


def shaped(results: dict[str, CallResult], text: str = BASE) -> tuple[int, Any]:
    _, status, body = answer(plan_of(text), Composite(results, None))
    return status, orjson.loads(body)


def ok(value: Any) -> CallResult:
    return CallResult("ok", value, 1.0)


def test_each_field_reads_its_path_and_nothing_else_appears_but_meta() -> None:
    status, doc = shaped(
        {
            "product": ok({"id": 42, "name": "Lamp", "brand": "Acme"}),
            "price": ok({"currency": "USD", "amount": 19.5}),
            "stock": ok({"available": 3}),
            "reviews": ok({"items": [{"text": "Great", "rating": 5}, {"text": "Meh"}]}),
        }
    )
    assert status == 200
    assert doc == {
        "id": 42,
        "title": "Lamp",
        "price": 19.5,
        "currency": "USD",
        "in_stock": 3,
        "first_review": "Great",
        "first_rating": 5,
        "_meta": {"complete": True, "sources": {}},
    }


def test_missing_fields_take_their_default_or_are_left_out_and_fallbacks_are_read() -> None:
    status, doc = shaped(
        {
            "product": ok({"id": 42, "name": None}),
            "price": CallResult("timeout", None, 1.0),
            "stock": CallResult("error", None, 1.0),
            "reviews": ok({"items": []}),
        }
    )
    assert status == 200
    # price's fallback is read (amount: null, currency: USD); stock is omitted, so in_stock is
    # left out; a list index past the end finds nothing; an explicit null is a value.
    assert doc == {
        "id": 42,
        "title": None,
        "price": None,
        "currency": "USD",
        "first_rating": 0,
        "_meta": {"complete": False, "sources": {"price": "timeout", "stock": "error"}},
    }


def test_hostile_shapes_of_values_find_nothing_rather_than_fail() -> None:
    status, doc = shaped(
        {
            "product": ok([1, 2]),
            "price": ok("text"),
            "stock": ok({"available": {"deep": [1]}}),
            "reviews": ok({"items": {"0": {"text": "not a list"}}}),
        }
    )
    assert status == 200
    assert doc == {
        "price": None,
        "currency": "EUR",
        "in_stock": {"deep": [1]},
        "first_rating": 0,
        "_meta": {"complete": True, "sources": {}},
    }


def test_a_required_failure_answers_its_error_unshaped() -> None:
    _, status, body = answer(
        plan_of(), Composite({"product": CallResult("not_found", None, 1.0)}, "product")
    )
    assert status == 404 and orjson.loads(body)["error"]["call"] == "product"


@pytest.mark.parametrize(
    ("old", "new", "where", "message"),
    [
        (
            "id: product.id",
            "id: produkt.id",
            "endpoints.0.shape.id:",
            "'produkt' names no call",
        ),
        (
            "in_stock: stock.available",
            "in_stock: stock.warehouse",
            "endpoints.0.shape.in_stock:",
            "keeps only available",
        ),
        (
            "{from: price.amount,",
            "{from: price..amount,",
            "endpoints.0.shape.price.from:",
            "dotted path",
        ),
        (
            "title: product.name",
            "_meta: product.name",
            "endpoints.0.shape._meta:",
            "the gateway's own",
        ),
    ],
)
def test_a_bad_path_is_refused_at_its_line(old: str, new: str, where: str, message: str) -> None:
    text = BASE.replace(old, new)
    (line,) = [n + 1 for n, t in enumerate(text.splitlines()) if new in t]
    (problem,) = problems(text)
    assert problem.startswith(f"gw.yaml:{line}: {where}") and message in problem, problem


def test_a_listing_cannot_have_a_shape_of_its_own() -> None:
    text = (
        BASE
        + """\
  - path: /products
    list: {item: "/products/{id:int}", ids: {query: ids}}
    shape: {x: product.id}
"""
    )
    (problem,) = problems(text)
    assert "endpoints.1.shape" in problem and "item endpoint's shape" in problem


SHIPPED_SHAPE = """    shape:
      id: product.id
      title: product.name
      price: {from: price.amount, default: null}
      currency: {from: price.currency, default: USD}
      in_stock: stock.available
      rating: reviews.average
      first_review: reviews.top.0.text
      related: recommendations.product_ids
"""


async def test_a_shaped_item_endpoint_shapes_its_answers_its_listings_and_its_openapi(
    sims: Any, catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    from tests.config_files import server_env

    # Before the listings: the last key of /products/{id:int}, after its calls.
    text = config_text(redis_prefix).replace(
        "  # Listings: one item", SHIPPED_SHAPE + "  # Listings: one item", 1
    )
    loaded = config.loads(text, "gateway.yaml", server_env(sims, catalog_dsn, "memory://"))
    async with serving_config(loaded) as url:
        async with http.get(f"{url}/products/42") as r:
            one = await r.json()
        async with http.get(f"{url}/products?ids=43,42") as r:
            listed = await r.json()
        async with http.get(f"{url}/openapi.json") as r:
            spec = await r.json()
    assert list(one) == [
        "id",
        "title",
        "price",
        "currency",
        "in_stock",
        "rating",
        "first_review",
        "related",
        "_meta",
    ]
    assert one["id"] == 42 and isinstance(one["related"], list)
    assert listed["items"][1] == one
    assert listed["items"][0]["id"] == 43
    ref = spec["paths"]["/products/{id}"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]["$ref"]
    schema = spec["components"]["schemas"][ref.removeprefix("#/components/schemas/")]
    assert list(schema["properties"]) == list(one)
    # Each field takes the schema its path finds in its call's declared schema.
    fields = schema["properties"]
    assert fields["id"] == {"type": "integer"} and fields["title"] == {"type": "string"}
    assert fields["price"] == {"type": ["number", "null"]}  # nullable already
    assert fields["in_stock"] == {"type": "integer"}  # through stock's null fallback
    assert fields["first_review"] == {"type": "string"}  # reviews.top.0.text
    assert fields["related"] == {"type": "array", "items": {"type": "integer"}}
    assert schema["required"] == ["price", "currency", "_meta"]  # the fields with a default


def test_a_path_part_of_non_ascii_digits_is_a_field_name_checked_like_any_other() -> None:
    # "²".isdigit() is True but int("²") fails: it must never be taken for a list index.
    text = BASE.replace("in_stock: stock.available", "in_stock: stock.²")
    (problem,) = problems(text)
    assert "endpoints.0.shape.in_stock" in problem and "no field '²'" in problem, problem
    steps = plan_of(BASE.replace("first_review: reviews.items.0.text", "first_review: reviews.٣"))
    (field,) = [f for f in steps.shape if f.name == "first_review"]
    assert field.path == ("٣",)
