"""Listings seen from outside: the shipped gateway.yaml served in-process on MariaDB, the memory
cache or Redis, and the simulated services, each recording the requests it received (the proof
of what was batched and what was served from the cache)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest

from gateway.config import loader as config
from gateway.demo.simulator import SERVICES, Service, UpstreamServer, serve_service
from tests.config_files import config_text
from tests.serving import serving_config

TOKEN = "admin-token-for-listing-tests"
BATCH_PATHS = {"pricing": "/prices", "inventory": "/stock", "reviews": "/reviews"}


@dataclass
class Stack:
    """A served gateway and the services behind it, with what each service received."""

    url: str
    services: dict[str, Service]
    servers: dict[str, UpstreamServer]

    def targets(self, service: str) -> list[str]:
        return [s.target for s in self.servers[service].seen]

    def batches(self, service: str) -> list[list[str]]:
        """The ids of each batch request `service` received, as sent."""
        out = []
        for seen in self.servers[service].seen:
            if seen.path == BATCH_PATHS.get(service, "/recommendations"):
                out.append(parse_qs(seen.query)["ids"][0].split(","))
        return out

    def forget(self) -> None:
        for server in self.servers.values():
            server.seen.clear()


@asynccontextmanager
async def recorded_services() -> AsyncIterator[
    tuple[dict[str, Service], dict[str, UpstreamServer]]
]:
    services = {name: Service(name) for name in SERVICES}
    servers: dict[str, UpstreamServer] = {}
    try:
        for name, service in services.items():
            server = UpstreamServer(record=True, cancel_on_disconnect=True)
            serve_service(server, service)
            await server.start()
            servers[name] = server
        yield services, servers
    finally:
        for server in servers.values():
            server.closing.set()
        for server in servers.values():
            await server.close()


@asynccontextmanager
async def stack(
    catalog_dsn: str, cache_url: str, prefix: str, edit: Mapping[str, str] | None = None
) -> AsyncIterator[Stack]:
    async with recorded_services() as (services, servers):
        env = {
            "CATALOG_DSN": catalog_dsn,
            "REDIS_URL": cache_url,
            "PRICING_URL": servers["pricing"].url,
            "INVENTORY_URL": servers["inventory"].url,
            "REVIEWS_URL": servers["reviews"].url,
            "RECS_URL": servers["recs"].url,
        }
        loaded = config.loads(config_text(prefix, edit), "gateway.yaml", env)
        async with serving_config(loaded) as url:
            yield Stack(url, services, servers)


@pytest.fixture(params=["memory", "redis"])
async def served(
    request: pytest.FixtureRequest,
    catalog_dsn: str,
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Stack]:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    cache_url = "memory://" if request.param == "memory" else redis_url
    async with stack(catalog_dsn, cache_url, redis_prefix) as s:
        yield s


async def get(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, Mapping[str, str], Any]:
    async with http.get(url, headers=headers or {}) as r:
        body = await r.read()
        return r.status, r.headers, orjson.loads(body) if body else None


async def test_items_keep_the_requested_order_and_duplicates_are_fetched_once(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    status, headers, doc = await get(http, f"{served.url}/products?ids=3,1,2,3,1")
    assert status == 200, doc
    assert [item["product"]["id"] for item in doc["items"]] == [3, 1, 2, 3, 1]
    assert doc["items"][0] == doc["items"][3]
    assert doc["_meta"] == {"complete": True, "items": {}}
    assert headers["X-Gateway-Complete"] == "true" and headers["X-Cache"] == "MISS"
    for service in ("pricing", "inventory", "reviews"):
        assert served.batches(service) == [["3", "1", "2"]], served.targets(service)
    # recommendations wait for their product's category: one request per item, never batched
    assert sorted(urlsplit(t).path for t in served.targets("recs")) == [
        "/recommendations/1",
        "/recommendations/2",
        "/recommendations/3",
    ]


async def test_an_item_is_the_same_document_whether_built_alone_or_in_a_listing(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{served.url}/products/7") as r:
        alone = await r.read()
    async with http.get(f"{served.url}/products?ids=8,7") as r:
        assert r.headers["Server-Timing"] == 'items;desc="MISS 1, HIT 1"'
        listed = orjson.loads(await r.read())["items"]
    async with http.get(f"{served.url}/products/8") as r:
        assert r.headers["X-Cache"] == "HIT"  # the listing computed and stored it
        eight = await r.read()
    assert listed == [orjson.loads(eight), orjson.loads(alone)]
    # Batched (8) or not (7), an item has the same fields: the batch's product_id is not kept.
    assert listed[0].keys() == listed[1].keys()
    assert listed[0]["price"].keys() == listed[1]["price"].keys()


async def test_cached_items_are_served_and_only_the_missing_ids_go_upstream(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    for i in (11, 12):
        assert (await get(http, f"{served.url}/products/{i}"))[0] == 200
    served.forget()
    status, headers, doc = await get(http, f"{served.url}/products?ids=11,13,12,14")
    assert status == 200
    assert [item["product"]["id"] for item in doc["items"]] == [11, 13, 12, 14]
    assert headers["Server-Timing"] == 'items;desc="HIT 2, MISS 2"'
    assert served.batches("pricing") == [["13", "14"]]
    assert served.batches("inventory") == [["13", "14"]]
    served.forget()
    status, headers, _ = await get(http, f"{served.url}/products?ids=14,13,11")
    assert headers["X-Cache"] == "HIT" and headers["Server-Timing"] == 'items;desc="HIT 3"'
    assert all(not served.targets(name) for name in SERVICES)


async def test_a_tag_purge_reaches_the_items_of_listings(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    assert (await get(http, f"{served.url}/products?ids=21,22"))[0] == 200
    async with http.post(
        f"{served.url}/admin/cache/purge",
        json={"tags": ["product:21"]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as r:
        assert r.status == 200, await r.text()
    served.forget()
    _, headers, _ = await get(http, f"{served.url}/products?ids=21,22")
    assert headers["Server-Timing"] == 'items;desc="MISS 1, HIT 1"'
    assert served.batches("pricing") == [["21"]]


async def test_an_item_whose_required_call_finds_nothing_is_null_in_its_place(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    status, headers, doc = await get(http, f"{served.url}/products?ids=31,99999,32")
    assert status == 200
    assert doc["items"][1] is None
    assert [doc["items"][0]["product"]["id"], doc["items"][2]["product"]["id"]] == [31, 32]
    assert doc["_meta"] == {"complete": False, "items": {"99999": "not_found"}}
    assert headers["X-Gateway-Complete"] == "false" and headers["Cache-Control"] == "no-store"
    # and the item endpoint agrees (the same cached not-found entry)
    assert (await get(http, f"{served.url}/products/99999"))[0] == 404


async def test_a_failed_batch_request_fails_that_call_for_each_item_and_its_fallback_applies(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    served.services["pricing"].behaviour.update({"error_rate": 1.0})
    status, _, doc = await get(http, f"{served.url}/products?ids=41,42,43")
    assert status == 200
    for item in doc["items"]:
        assert item["price"] == {"currency": "USD", "amount": None}
        assert item["_meta"] == {"complete": False, "sources": {"price": "error"}}
        assert item["stock"] is not None
    partial = dict.fromkeys(["41", "42", "43"], "partial")
    assert doc["_meta"] == {"complete": False, "items": partial}
    # one batch request per attempt (the source retries once), never one per item
    assert served.batches("pricing") == [["41", "42", "43"]] * 2
    assert len(served.batches("inventory")) == 1


async def test_batches_are_chunked_by_max_and_the_chunks_run_concurrently(
    catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    edit = {
        "key: product_id, max: 50}\n        select: [currency": (
            "key: product_id, max: 2}\n        select: [currency"
        )
    }
    async with stack(catalog_dsn, "memory://", redis_prefix, edit) as s:
        status, _, doc = await get(http, f"{s.url}/products?ids=51,52,53,54,55")
        assert status == 200 and doc["_meta"]["complete"], doc
        assert sorted(s.batches("pricing")) == [["51", "52"], ["53", "54"], ["55"]]
        assert s.batches("inventory") == [["51", "52", "53", "54", "55"]]
        # Concurrent: with pricing holding every request, all three chunks of a cold listing
        # arrive while the first is still held (one after another, the second would come only
        # once the first timed out, 1.5 s later).
        s.forget()
        s.services["pricing"].behaviour.update({"hang_rate": 1.0})
        listing = asyncio.create_task(get(http, f"{s.url}/products?ids=61,62,63,64,65"))
        try:
            async with asyncio.timeout(1.2):
                await s.servers["pricing"].wait_seen(3)
        finally:
            listing.cancel()
        assert sorted(s.batches("pricing")) == [["61", "62"], ["63", "64"], ["65"]]


async def test_ids_from_a_call_of_the_listing(served: Stack, http: aiohttp.ClientSession) -> None:
    status, _, doc = await get(http, f"{served.url}/categories/toys/products")
    assert status == 200, doc
    ids = [item["product"]["id"] for item in doc["items"]]
    assert len(ids) == 24 and ids == sorted(ids)
    assert {item["product"]["category"] for item in doc["items"]} == {"toys"}
    assert served.batches("pricing") == [[str(i) for i in ids]]
    # each item's recommendations asked with its own product's category, once the batch answered
    recs = served.targets("recs")
    assert len(recs) == 24 and all("category=toys" in t for t in recs)
    status, _, doc = await get(http, f"{served.url}/categories/no-such-category/products")
    assert status == 200 and doc == {"items": [], "_meta": {"complete": True, "items": {}}}


async def test_concurrent_listings_of_the_same_items_fetch_each_item_once(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    served.services["pricing"].behaviour.update({"delay_ms": 100})
    urls = [f"{served.url}/products?ids=61,62,63"] * 4 + [f"{served.url}/products/62"] * 2
    answers = await asyncio.gather(*(get(http, u) for u in urls))
    assert all(status == 200 for status, _, _ in answers)
    assert (
        sum(len(b) for b in served.batches("pricing"))
        + sum(1 for t in served.targets("pricing") if t.startswith("/prices/"))
        == 3
    ), served.targets("pricing")


async def test_bad_ids_too_many_ids_and_no_ids_are_422(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    status, _, doc = await get(http, f"{served.url}/products?ids=1,x,3")
    assert status == 422
    assert doc["detail"][0]["loc"] == ["query", "ids", 1]
    status, _, doc = await get(http, f"{served.url}/products?ids=" + ",".join(["1"] * 49))
    assert status == 422 and doc["detail"][0]["type"] == "too_long"
    status, _, doc = await get(http, f"{served.url}/products")
    assert status == 422 and doc["detail"][0]["type"] == "missing"
    status, _, doc = await get(http, f"{served.url}/products?ids=1,99999999999999999999")
    assert status == 422
    assert all(not served.targets(name) for name in SERVICES)


async def test_a_listing_answers_304_to_its_own_etag(
    served: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{served.url}/products?ids=71,72") as r:
        etag = r.headers["ETag"]
        await r.read()
    async with http.get(f"{served.url}/products?ids=71,72", headers={"If-None-Match": etag}) as r:
        assert r.status == 304 and await r.read() == b""
    async with http.get(f"{served.url}/products?ids=72,71", headers={"If-None-Match": etag}) as r:
        assert r.status == 200


async def test_a_hung_upstream_costs_its_items_their_part_within_the_listing_deadline(
    catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    # The shipped deadlines and timeouts (not the tests' generous ones): 400 ms for the listing.
    async with recorded_services() as (services, servers):
        env = {
            "CATALOG_DSN": catalog_dsn,
            "REDIS_URL": "memory://",
            **{
                f"{var}_URL": servers[name].url
                for var, name in (
                    ("PRICING", "pricing"),
                    ("INVENTORY", "inventory"),
                    ("REVIEWS", "reviews"),
                    ("RECS", "recs"),
                )
            },
        }
        loaded = config.loads(config_text(redis_prefix, generous=False), "gateway.yaml", env)
        async with serving_config(loaded) as url:
            services["reviews"].behaviour.update({"hang_rate": 1.0})
            services["recs"].behaviour.update({"hang_rate": 1.0})
            started = time.monotonic()
            status, _, doc = await get(http, f"{url}/products?ids=81,82,83,84")
            took = time.monotonic() - started
    assert status == 200, doc
    assert took < 0.4 + 3, took  # the deadline, plus a wide margin for a busy machine
    for item in doc["items"]:
        assert "reviews" not in item  # fallback: omit
        assert item["recommendations"] == {"product_ids": []}
        assert item["_meta"]["sources"] == {"reviews": "timeout", "recommendations": "timeout"}
        assert item["price"]["currency"] == "USD" and item["stock"] is not None
    assert doc["_meta"]["items"] == dict.fromkeys(["81", "82", "83", "84"], "partial")


async def test_openapi_documents_the_listings(served: Stack, http: aiohttp.ClientSession) -> None:
    _, _, spec = await get(http, f"{served.url}/openapi.json")
    op = spec["paths"]["/products"]["get"]
    (ids,) = [p for p in op["parameters"] if p["in"] == "query"]
    assert ids["in"] == "query" and ids["required"] and not ids["explode"]
    assert ids["schema"]["type"] == "array" and ids["schema"]["maxItems"] == 48
    assert ids["schema"]["items"]["type"] == "integer"
    schemas = spec["components"]["schemas"]

    def resolved(schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref", "")
        return schemas[ref.removeprefix("#/components/schemas/")] if ref else schema

    body = resolved(op["responses"]["200"]["content"]["application/json"]["schema"])
    item = spec["paths"]["/products/{id}"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    # The item is one shared component, referenced by the item endpoint and the listing alike.
    assert item == {"$ref": "#/components/schemas/ProductsIdDocument"}
    assert body["properties"]["items"]["items"]["anyOf"] == [item, {"type": "null"}]
    meta = resolved(body["properties"]["_meta"])
    meta_items = meta["properties"]["items"]["additionalProperties"]
    assert meta_items["enum"] == ["not_found", "partial", "error", "timeout"]
    assert set(op["responses"]) == {"200", "304", "422"}
    by_call = spec["paths"]["/categories/{slug}/products"]["get"]
    assert [p["name"] for p in by_call["parameters"] if p["in"] == "path"] == ["slug"]
    assert {"200", "404", "422", "502", "503", "504"} <= set(by_call["responses"])


async def test_ids_past_the_listings_max_are_counted_not_fetched(
    catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    edit = {"ids: {call: page, field: id}": "ids: {call: page, field: id, max: 5}"}
    async with stack(catalog_dsn, "memory://", redis_prefix, edit) as s:
        status, headers, doc = await get(http, f"{s.url}/categories/books/products")
    assert status == 200
    assert len(doc["items"]) == 5 and doc["_meta"] == {
        "complete": False,
        "items": {},
        "dropped": 19,
    }
    assert headers["X-Gateway-Complete"] == "false"
    assert [len(b) for b in s.batches("pricing")] == [5]


async def test_a_failing_ids_call_fails_the_listing_as_a_required_call_does(
    catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    edit = {"ORDER BY id LIMIT 24": "ORDER BY no_such_column LIMIT 24"}
    async with stack(catalog_dsn, "memory://", redis_prefix, edit) as s:
        status, headers, doc = await get(http, f"{s.url}/categories/books/products")
    assert status == 502, doc
    assert doc["error"]["call"] == "page" and headers["Cache-Control"] == "no-store"
    assert not s.batches("pricing")


async def test_items_whose_required_call_fails_are_null_and_the_listing_still_answers(
    redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    from tests.support import free_port

    dead = f"mysql://root@127.0.0.1:{free_port()}/catalog"
    async with stack(dead, "memory://", redis_prefix) as s:
        status, headers, doc = await get(http, f"{s.url}/products?ids=91,92")
        assert status == 200, doc
        assert doc["items"] == [None, None]
        assert set(doc["_meta"]["items"].values()) <= {"error", "timeout"}
        assert doc["_meta"]["complete"] is False and headers["Cache-Control"] == "no-store"
        status, _, doc = await get(http, f"{s.url}/products?ids=")
        assert status == 200 and doc == {"items": [], "_meta": {"complete": True, "items": {}}}


async def test_an_optional_ids_call_that_fails_fails_the_listing_never_an_empty_page(
    catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    edit = {
        "calls: {page: {source: catalog, required: true,": "calls: {page: {source: catalog,",
        "ORDER BY id LIMIT 24": "ORDER BY no_such_column LIMIT 24",
    }
    async with stack(catalog_dsn, "memory://", redis_prefix, edit) as s:
        status, headers, doc = await get(http, f"{s.url}/categories/books/products")
    assert status == 502, doc
    assert doc["error"]["call"] == "page" and headers["X-Gateway-Complete"] == "false"


async def test_an_item_computed_by_a_listing_keeps_to_its_own_endpoints_deadline(
    catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    # The listing may wait 5 s; the item endpoint, 1 s: a hung reviews call costs the items
    # computed for the listing no more than the item endpoint's deadline, so an item request
    # that follows the listing's fan-out of the same item is never left waiting past its own.
    async with recorded_services() as (services, servers):
        text = f"""
version: 1
cache: {{url: "memory://", key_prefix: "{redis_prefix}"}}
sources:
  catalog: {{kind: sql, dsn: "{catalog_dsn}", timeout_ms: 1000}}
  reviews: {{kind: http, base_url: "{servers["reviews"].url}", timeout_ms: 1000,
             retry: {{attempts: 5, backoff_ms: 10, on: [timeout], budget_ratio: 1}}}}
endpoints:
  - path: /products/{{id:int}}
    deadline_ms: 1000
    cache: {{ttl_s: 60, partial_ttl_s: 5}}
    calls:
      product:
        source: catalog
        query: "SELECT id, name FROM products WHERE id = %(id)s"
        one: true
        required: true
        batch: {{query: "SELECT id, name FROM products WHERE id IN %(id*)s", key: id}}
      reviews: {{source: reviews, path: "/products/{{id}}/reviews", fallback: null}}
  - path: /products
    deadline_ms: 5000
    list: {{item: "/products/{{id:int}}", ids: {{query: ids}}}}
"""
        loaded = config.loads(text, "gateway.yaml", {})
        async with serving_config(loaded) as url:
            services["reviews"].behaviour.update({"hang_rate": 1.0})
            started = time.monotonic()
            listing, single = await asyncio.gather(
                get(http, f"{url}/products?ids=101,102"), get(http, f"{url}/products/101")
            )
            took = time.monotonic() - started
    assert listing[0] == 200 and single[0] == 200, (listing, single)
    assert single[2]["_meta"]["sources"] == {"reviews": "timeout"}
    assert listing[2]["_meta"]["items"] == {"101": "partial", "102": "partial"}
    # one item deadline (1 s) plus a wide margin; the listing's own would allow 5 retried seconds
    assert took < 3.5, took


async def test_a_batch_request_keeps_to_its_batch_timeout(
    catalog_dsn: str, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    edit = {
        "key: product_id, max: 50}\n        select: [currency": (
            "key: product_id, max: 50, timeout_ms: 100}\n        select: [currency"
        )
    }
    async with stack(catalog_dsn, "memory://", redis_prefix, edit) as s:
        s.services["pricing"].behaviour.update({"delay_ms": 1000})  # under the call's 1.5 s
        status, _, doc = await get(http, f"{s.url}/products?ids=111,112")
    assert status == 200
    assert [item["_meta"]["sources"] for item in doc["items"]] == [{"price": "timeout"}] * 2
