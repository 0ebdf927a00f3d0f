"""Listings and `batch:` blocks in gateway.yaml: every mistake is refused at its line and field,
the shipped config plans its batches and listings, and the batch renderers build what the
upstreams are sent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import calls
from gateway.config import loader as config
from gateway.config.schema import BatchConfig
from gateway.core.plan import BatchPlan, ListingPlan, build_plans
from gateway.core.types import Call
from tests.config_files import problems
from upstreams import http, postgresql

ROOT = Path(__file__).resolve().parent.parent

# The comments are markers: a case names the line it expects by text found on one line only.
BASE = """\
version: 1
sources:
  catalog: {kind: sql, dsn: "sqlite:///tmp/x.db", timeout_ms: 100}
  pricing: {kind: http, base_url: "http://127.0.0.1:9101", timeout_ms: 100}
endpoints:
  - path: /products/{id:int}
    deadline_ms: 300
    calls:
      product:
        source: catalog
        query: "SELECT id, sku, category FROM products WHERE id = %(id)s"
        one: true
        required: true
        batch:  # product batch
          query: "SELECT id, sku, category FROM products WHERE id IN %(id*)s"
          key: id
      price:
        source: pricing
        path: /prices/{id}
        batch:  # price batch
          path: /prices  # batch path
          query: {ids: "{id*}"}
          key: product_id
          max: 50
        fallback: null
  - path: /products
    list:
      item: "/products/{id:int}"  # item of the query listing
      ids:  # ids from the query
        query: ids
        max: 48
  - path: /categories/{slug}/products
    calls:
      page:
        source: catalog
        query: "SELECT id FROM products WHERE category = %(slug)s"
    list:
      item: "/products/{id:int}"  # item of the call listing
      ids:  # ids from a call
        call: page
        field: id
"""

SHOPS = """\
  - path: /shops/{shop}/products/{id:int}
    calls:
      stock:  # shop stock
        source: pricing
        path: /shops/{shop}/stock/{id}
"""

FEATURED = """\
  - path: /featured
    calls:
      top:
        source: catalog
        query: "SELECT id FROM products ORDER BY id LIMIT 5"
        batch:  # featured batch
          query: "SELECT id FROM products WHERE id IN %(id*)s"
          key: id
"""

SHOP_BATCH = """\
  - path: /shops/{shop}/products/{id:int}
    calls:
      stock:
        source: catalog
        query: "SELECT * FROM stock WHERE shop = %(shop)s AND id = %(id)s"
        batch:  # shop batch
          query: "SELECT * FROM stock WHERE id IN %(id*)s"
          key: id
"""


def sub(*pairs: str, text: str = BASE) -> str:
    """Return `text` with each (old, new) pair replaced; each old must occur exactly once."""
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert text.count(old) == 1, f"{old!r} must occur once"
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Case:
    """A broken file, the one problem it must get: its field path, the text on its line, and a
    fragment of its message."""

    text: str
    path: str
    at: str
    message: str

    def line(self) -> int:
        found = [n for n, line in enumerate(self.text.splitlines(), 1) if self.at in line]
        assert len(found) == 1, f"{self.at!r} must be on exactly one line, is on {found}"
        return found[0]


LISTING_ITEM = 'item: "/products/{id:int}"  # item of the call listing'

CASES: dict[str, Case] = {
    # --- list: item
    "unknown item endpoint": Case(
        sub(LISTING_ITEM, 'item: "/nope/{id:int}"'),
        "endpoints.2.list.item",
        'item: "/nope/{id:int}"',
        "unknown item endpoint '/nope/{id:int}' (endpoints: /products/{id:int})",
    ),
    "item endpoint is a listing": Case(
        sub(LISTING_ITEM, 'item: "/products"'),
        "endpoints.2.list.item",
        'item: "/products"',
        "an item endpoint cannot itself be a listing",
    ),
    "item endpoint with two path parameters": Case(
        sub(LISTING_ITEM, 'item: "/shops/{shop}/products/{id:int}"') + SHOPS,
        "endpoints.2.list.item",
        'item: "/shops/',
        "exactly one path parameter, its id (/shops/{shop}/products/{id:int} has 2)",
    ),
    # --- list: ids
    "ids.max 0": Case(
        sub("max: 48", "max: 0"), "endpoints.1.list.ids.max", "max: 0", "greater than or equal to 1"
    ),
    "ids.max 1001": Case(
        sub("max: 48", "max: 1001"),
        "endpoints.1.list.ids.max",
        "max: 1001",
        "less than or equal to 1000",
    ),
    "ids from both query and call": Case(
        sub("        query: ids\n", "        query: ids\n        call: page\n"),
        "endpoints.1.list.ids",
        "# ids from the query",
        "give either query (a query parameter) or call (and field)",
    ),
    "ids.call without field": Case(
        sub("        field: id\n", ""),
        "endpoints.2.list.ids",
        "# ids from a call",
        "ids from a call need field",
    ),
    "ids.call naming no call": Case(
        sub("call: page", "call: pages"),
        "endpoints.2.list.ids.call",
        "call: pages",
        "unknown call 'pages' (this listing's calls: page)",
    ),
    # --- what a listing may hold
    "listing with a cache block": Case(
        sub("  - path: /products\n", "  - path: /products\n    cache: {ttl_s: 5}\n"),
        "endpoints.1.cache",
        "cache: {ttl_s: 5}",
        "a listing is cached per item",
    ),
    "listing with ids from the query has calls": Case(
        sub(
            "  - path: /products\n",
            "  - path: /products\n    calls:\n      extra: {source: pricing, path: /x}\n",
        ),
        "endpoints.1.calls.extra",
        "extra:",
        "a listing whose ids come from the query has no calls of its own",
    ),
    "listing call not needed by the ids call": Case(
        sub(
            "    list:\n      " + LISTING_ITEM,
            '      extra: {source: pricing, path: "/x/{slug}"}\n    list:\n      ' + LISTING_ITEM,
        ),
        "endpoints.2.calls.extra",
        "extra:",
        "extra is not page and not waited for by it",
    ),
    # --- starred templates outside batch
    "{id*} in a call's path": Case(
        sub("path: /prices/{id}", "path: /prices/{id*}"),
        "endpoints.0.calls.price.path",
        "path: /prices/{id*}",
        "{id*} is the ids of a batch: only in a batch block",
    ),
    "{id*} in a call's query value": Case(
        sub(
            "        fallback: null",
            '        query: {ids: "{id*}", v: "1"}\n        fallback: null',
        ),
        "endpoints.0.calls.price.query",
        'v: "1"',
        "{id*} is the ids of a batch: only in a batch block",
    ),
    "%(id*)s in a sql call's query": Case(
        sub("WHERE id = %(id)s", "WHERE id IN %(id*)s AND 1 = 1"),
        "endpoints.0.calls.product.query",
        "AND 1 = 1",
        "%(id*)s is the ids of a batch: only in a batch block",
    ),
    # --- where a batch may be
    "batch on a call that waits for another": Case(
        sub(
            "        fallback: null",
            '        query: {c: "{product.category}"}\n        fallback: null',
        ),
        "endpoints.0.calls.price.batch",
        "# price batch",
        "a call that waits for another (product) cannot be batched",
    ),
    "batch on an endpoint without path parameters": Case(
        BASE + FEATURED,
        "endpoints.3.calls.top.batch",
        "# featured batch",
        "only an item endpoint (one path parameter, its id) can batch its calls",
    ),
    "batch on an endpoint with two path parameters": Case(
        BASE + SHOP_BATCH,
        "endpoints.3.calls.stock.batch",
        "# shop batch",
        "only an item endpoint (one path parameter, its id) can batch its calls",
    ),
    # --- http batches
    "http batch without {id*}": Case(
        sub('query: {ids: "{id*}"}', 'query: {ids: "1,2"}'),
        "endpoints.0.calls.price.batch.path",
        "# batch path",
        "a batch must send its ids: use {id*} in path or query",
    ),
    "http batch query with another template": Case(
        sub('query: {ids: "{id*}"}', 'query: {ids: "{id*}", sku: "{product.sku}"}'),
        "endpoints.0.calls.price.batch.query",
        "{product.sku}",
        "a batch can only use {id*} (the item endpoint's id), not {product.sku}",
    ),
    "http batch path with another template": Case(
        sub("path: /prices  # batch path", "path: /prices/{product.sku}  # batch path"),
        "endpoints.0.calls.price.batch.path",
        "/prices/{product.sku}",
        "a batch can only use {id*} (the item endpoint's id), not {product.sku}",
    ),
    "http batch query value mixing text and {id*}": Case(
        sub('query: {ids: "{id*}"}', 'query: {ids: "x{id*}"}'),
        "endpoints.0.calls.price.batch.query",
        "x{id*}",
        "a query value is {id*} alone, or literal text",
    ),
    # --- sql batches
    "sql batch without %(id*)s": Case(
        sub("WHERE id IN %(id*)s", "WHERE id IN (1, 2)"),
        "endpoints.0.calls.product.batch.query",
        "IN (1, 2)",
        "a sql batch must bind its ids: use IN %(id*)s",
    ),
    "sql batch binding another %(name)s": Case(
        sub("WHERE id IN %(id*)s", "WHERE id IN %(id*)s AND sku = %(sku)s"),
        "endpoints.0.calls.product.batch.query",
        "AND sku = %(sku)s",
        "a sql batch binds only %(id*)s, not %(sku)s",
    ),
    "sql batch with another starred name": Case(
        sub("WHERE id IN %(id*)s", "WHERE id IN %(id*)s AND sku IN %(other*)s"),
        "endpoints.0.calls.product.batch.query",
        "%(other*)s",
        "%(other*)s: the item endpoint's id is id",
    ),
    # --- batch fields
    "batch.max 0": Case(
        sub("max: 50", "max: 0"),
        "endpoints.0.calls.price.batch.max",
        "max: 0",
        "greater than or equal to 1",
    ),
    "batch.max 1001": Case(
        sub("max: 50", "max: 1001"),
        "endpoints.0.calls.price.batch.max",
        "max: 1001",
        "less than or equal to 1000",
    ),
    "batch timeout longer than the deadline": Case(
        sub("          max: 50\n", "          max: 50\n          timeout_ms: 301\n"),
        "endpoints.0.calls.price.batch.timeout_ms",
        "timeout_ms: 301",
        "longer than the endpoint's deadline_ms 300",
    ),
    "batch without key": Case(
        sub("          key: id\n", ""),
        "endpoints.0.calls.product.batch.key",
        "# product batch",
        "Field required",
    ),
}


def test_the_base_config_loads() -> None:
    # Every case below breaks one thing of this file: it must be fine as it is.
    loaded = config.loads(BASE, "gw.yaml", {})
    assert [ep.listing is not None for ep in loaded.config.endpoints] == [False, True, True]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_broken_listing_or_batch_is_refused_at_its_line_and_field(case: Case) -> None:
    (problem,) = problems(case.text)
    assert problem.startswith(f"gw.yaml:{case.line()}: {case.path}: "), problem
    assert case.message in problem


def test_a_listing_call_that_the_ids_call_waits_for_is_allowed() -> None:
    text = sub(
        "      page:\n        source: catalog\n",
        '      first: {source: pricing, path: "/categories/{slug}"}\n'
        "      page:\n        source: catalog\n        args: {cat: '{first.id}'}\n",
        'WHERE category = %(slug)s"',
        'WHERE category = %(cat)s"',
    )
    loaded = config.loads(text, "gw.yaml", {})
    assert list(loaded.config.endpoints[2].calls) == ["first", "page"]


# --- the shipped config ----------------------------------------------------------------------


def test_shipped_config_plans_batches_for_every_call_but_recommendations() -> None:
    loaded = config.load(ROOT / "gateway.yaml", env={})
    item, _, _ = build_plans(loaded.config)
    assert item.id == "GET /products/{id:int}"
    batches = {cp.name: cp.batch for cp in item.calls}
    assert list(batches) == ["product", "price", "stock", "reviews", "recommendations"]
    assert batches["recommendations"] is None
    product, price, stock, reviews = (batches[n] for n in ("product", "price", "stock", "reviews"))
    assert isinstance(product, BatchPlan)
    assert (product.key, product.max, product.rows) == ("id", 100, False)  # one: true
    for plan in (price, stock, reviews):
        assert isinstance(plan, BatchPlan)
        assert (plan.key, plan.max, plan.rows) == ("product_id", 50, False)
    assert product.render([3, 1])[1] == {"_id_0": 3, "_id_1": 1}
    assert isinstance(price, BatchPlan)
    assert price.render([3, 1]) == ("/prices", {"ids": (3, 1)})
    assert item.listing is None


def test_shipped_config_plans_its_two_listings() -> None:
    loaded = config.load(ROOT / "gateway.yaml", env={})
    _, by_query, by_category = build_plans(loaded.config)
    assert by_query.id == "GET /products"
    assert by_query.listing == ListingPlan("GET /products/{id:int}", 48, query="ids")
    assert by_query.calls == ()
    assert by_category.id == "GET /categories/{slug}/products"
    assert by_category.listing == ListingPlan("GET /products/{id:int}", 48, call="page", field="id")
    assert [cp.name for cp in by_category.calls] == ["page"]
    assert by_category.cache is None and by_query.cache is None


def test_shipped_effective_config_shows_list_as_written() -> None:
    loaded = config.load(ROOT / "gateway.yaml", env={})
    endpoints = loaded.redacted()["endpoints"]
    assert "listing" not in endpoints[1] and "listing" not in endpoints[2]
    assert endpoints[1]["list"] == {
        "item": "/products/{id:int}",
        "ids": {"query": "ids", "call": None, "field": None, "max": 48},
    }
    assert endpoints[2]["list"]["ids"]["call"] == "page"
    assert endpoints[0]["list"] is None


def test_a_batch_query_literal_is_as_secret_as_a_call_query_literal() -> None:
    # A call's query literals are secrets (an api key often rides there); its batch form sends
    # the same kind of value to the same source.
    text = sub(
        'query: {ids: "{id*}"}',
        'query: {ids: "{id*}", api_key: "s3cr3t-batch"}',
        "        fallback: null",
        '        query: {api_key: "s3cr3t-call"}\n        fallback: null',
    )
    price = config.loads(text, "gw.yaml", {}).redacted()["endpoints"][0]["calls"]["price"]
    assert price["query"] == {"api_key": "***"}
    assert price["batch"]["query"] == {"ids": "{id*}", "api_key": "***"}


# --- the renderers ---------------------------------------------------------------------------

IDS = ["a,b", "c/d", "é", 7]


def test_http_batch_path_holds_each_id_as_one_encoded_segment_comma_joined() -> None:
    render = calls.http_batch_render(BatchConfig(path="/p/{id*}", key="id"), "id")
    assert render(IDS) == ("/p/a%2Cb,c%2Fd,%C3%A9,7", {})
    assert render([".."]) == ("/p/%2E%2E", {})


def test_http_batch_query_id_star_is_a_tuple_and_other_values_stay_literal() -> None:
    batch = BatchConfig(path="/prices", query={"ids": "{id*}", "v": "2"}, key="id")
    target, params = calls.http_batch_render(batch, "id")(IDS)
    assert target == "/prices"
    assert params == {"ids": ("a,b", "c/d", "é", 7), "v": "2"}


def test_http_url_escapes_each_value_of_a_tuple_and_joins_them_by_commas() -> None:
    call = Call(
        source="pricing",
        name="price",
        target="/prices",
        params={"ids": tuple(IDS), "v": "a b"},
        timeout=1.0,
        deadline=0.0,
    )
    assert http._url("http://h:1", call) == "http://h:1/prices?ids=a%2Cb,c%2Fd,%C3%A9,7&v=a%20b"


SQL_BATCH = BatchConfig(
    query="SELECT id FROM t WHERE name LIKE 'a%%' AND id IN %(id*)s ORDER BY id", key="id"
)


def test_sql_batch_pyformat_has_one_placeholder_per_id() -> None:
    render = calls.sql_batch_render(calls.keep_pyformat, SQL_BATCH, "id")
    sql, params = render([5, "x", 5])
    assert sql == (
        "SELECT id FROM t WHERE name LIKE 'a%%' AND id IN (%(_id_0)s, %(_id_1)s, %(_id_2)s) "
        "ORDER BY id"
    )
    assert list(params.items()) == [("_id_0", 5), ("_id_1", "x"), ("_id_2", 5)]


def test_sql_batch_positional_numbers_placeholders_in_bind_order() -> None:
    render = calls.sql_batch_render(postgresql.positional, SQL_BATCH, "id")
    sql, params = render([9, 8, 7])
    assert sql == "SELECT id FROM t WHERE name LIKE 'a%' AND id IN ($1, $2, $3) ORDER BY id"
    assert list(params.values()) == [9, 8, 7]


@pytest.mark.parametrize("translate", [calls.keep_pyformat, postgresql.positional])
def test_sql_batch_reuses_the_text_of_a_size_it_rendered_before(
    translate: Callable[[str], tuple[str, Sequence[str]]],
) -> None:
    render = calls.sql_batch_render(translate, SQL_BATCH, "id")
    first, first_params = render([1, 2])
    second, second_params = render([3, 4])
    assert second is first
    assert list(first_params.values()) == [1, 2] and list(second_params.values()) == [3, 4]
    third, _ = render([1, 2, 3])
    assert third != first and third.count(",") == first.count(",") + 1


def test_a_batch_timeout_is_its_requests_and_the_call_keeps_its_own() -> None:
    text = sub("          max: 50\n", "          max: 50\n          timeout_ms: 250\n")
    item = build_plans(config.loads(text, "gw.yaml", {}).config)[0]
    product, price = item.calls
    assert price.batch is not None and price.batch.timeout == 0.25 and price.timeout == 0.1
    assert product.batch is not None and product.batch.timeout is None
