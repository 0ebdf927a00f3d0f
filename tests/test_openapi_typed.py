"""The OpenAPI document as a storefront team uses it: a client generated from it with
openapi-python-client is typed and talks to the real gateway, and openapi-core finds no live
answer of any status that breaks the document.

The gateway serves the shipped gateway.yaml on loopback against the simulated services and the
real MariaDB catalog.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import typing
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_spec_validator import validate as validate_spec
from werkzeug.datastructures import Headers, ImmutableMultiDict

from gateway.app import create_app
from gateway.config import loader as config
from gateway.demo.simulator import Simulators
from gateway.ops.token import TOKEN_ENV
from tests.config_files import config_text, server_env
from tests.serving import serving_config

TOKEN = "admin-token-for-the-typed-openapi-tests"
PACKAGE = "gateway_typed_client"
"""The generated client's package name (a directory of the test's own)."""

TYPED_CALLS = ("product", "price", "stock", "reviews", "recommendations")


def shipped_document() -> dict[str, Any]:
    """Return the OpenAPI document of the shipped gateway.yaml, with the admin API on."""
    env = {"CATALOG_DSN": "sqlite:///unused.db", "REDIS_URL": "memory://"}
    loaded = config.loads(config_text("gw:"), "gateway.yaml", env)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        return create_app(loaded=loaded).openapi()


@pytest.fixture(scope="module")
def client_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client openapi-python-client generates from the shipped document, imported."""
    root = tmp_path_factory.mktemp("generated")
    spec = root / "openapi.json"
    spec.write_bytes(orjson.dumps(shipped_document()))
    venv_bin = Path(sys.executable).parent
    done = subprocess.run(
        [
            str(venv_bin / "openapi-python-client"),
            "generate",
            "--path",
            str(spec),
            "--meta",
            "none",
            "--output-path",
            str(root / PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": str(root)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Warnings mean parts of the document were skipped (ruff missing would be one as well).
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def hints(package: str, cls: type) -> dict[str, Any]:
    """Return a generated model's attribute types, its forward references resolved."""
    models = importlib.import_module(f"{package}.models")
    types = importlib.import_module(f"{package}.types")
    found = typing.get_type_hints(cls, localns={**vars(models), **vars(types)})
    found.pop("additional_properties", None)  # every model keeps unknown keys there
    return found


def mentions_any(tp: Any) -> bool:
    """Return whether a type is, or has inside it, `Any`."""
    return tp is Any or any(mentions_any(a) for a in typing.get_args(tp))


def test_the_document_is_valid_openapi() -> None:
    validate_spec(shipped_document())


def test_the_generated_client_types_every_declared_call_result(
    client_package: ModuleType,
) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    document = hints(PACKAGE, models.ProductsIdDocument)
    assert set(document) == {*TYPED_CALLS, "field_meta"}
    for name in TYPED_CALLS:
        assert not mentions_any(document[name]), (name, document[name])
    typed = [
        models.ProductsIdDocumentProduct,
        models.ProductsIdDocumentPrice,
        models.ProductsIdDocumentStockType0,
        models.ProductsIdDocumentReviews,
        models.ProductsIdDocumentReviewsTopItem,
        models.ProductsIdDocumentRecommendations,
        models.Meta,
        models.ErrorBody,
        models.ErrorBodyError,
        models.ListingMeta,
    ]
    for cls in typed:
        for attr, tp in hints(PACKAGE, cls).items():
            assert not mentions_any(tp), (cls.__name__, attr, tp)
    product = hints(PACKAGE, models.ProductsIdDocumentProduct)
    assert product["id"] is int and product["sku"] is str
    # Shared components: one Meta and one error body, not a copy per endpoint and status.
    names = {n for n in dir(models) if not n.startswith("_")}
    assert not [n for n in names if n.endswith("Meta") and n not in ("Meta", "ListingMeta")]
    assert sorted(n for n in names if n.startswith("ErrorBody")) == [
        "ErrorBody",
        "ErrorBodyError",
        "ErrorBodyErrorOutcome",
    ]
    outcomes = {o.value for o in models.ErrorBodyErrorOutcome}
    assert outcomes == {"not_found", "error", "timeout", "circuit_open", "overloaded", "skipped"}


@asynccontextmanager
async def gateway(
    sims: Simulators, catalog_dsn: str, edit: Mapping[str, str] | None = None
) -> AsyncIterator[str]:
    """Serve the shipped gateway.yaml (generous timeouts, `edit` applied) with the admin API."""
    env = server_env(sims, catalog_dsn, "memory://", admin_token=TOKEN)
    loaded = config.loads(config_text("gw:", edit), "gateway.yaml", env)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        async with serving_config(loaded) as url:
            yield url


async def test_the_generated_client_calls_every_get_route(
    client_package: ModuleType, sims: Simulators, catalog_dsn: str
) -> None:
    api = importlib.import_module(f"{PACKAGE}.api")
    models = importlib.import_module(f"{PACKAGE}.models")
    endpoints = importlib.import_module(f"{PACKAGE}.api.endpoints")
    operations = importlib.import_module(f"{PACKAGE}.api.operations")
    admin = importlib.import_module(f"{PACKAGE}.api.admin")
    assert api is not None
    for module in ("get_products_id", "get_products", "get_categories_slug_products"):
        importlib.import_module(f"{endpoints.__name__}.{module}")
    for module in ("healthz_healthz_get", "readyz_readyz_get", "handle_metrics_get"):
        importlib.import_module(f"{operations.__name__}.{module}")
    for module in ("config_admin_config_get", "sources_admin_sources_get"):
        importlib.import_module(f"{admin.__name__}.{module}")
    clients = importlib.import_module(PACKAGE)
    async with gateway(sims, catalog_dsn) as url:
        async with (
            clients.Client(base_url=url, raise_on_unexpected_status=True) as plain,
            clients.AuthenticatedClient(
                base_url=url, token=TOKEN, raise_on_unexpected_status=True
            ) as authed,
            clients.Client(base_url=url) as anonymous,
        ):
            one = await endpoints.get_products_id.asyncio_detailed(42, client=plain)
            assert one.status_code == 200
            doc = one.parsed
            assert isinstance(doc, models.ProductsIdDocument)
            assert (
                isinstance(doc.product, models.ProductsIdDocumentProduct) and doc.product.id == 42
            )
            assert isinstance(doc.price, models.ProductsIdDocumentPrice)
            assert isinstance(doc.stock, models.ProductsIdDocumentStockType0)
            assert isinstance(doc.reviews, models.ProductsIdDocumentReviews)
            assert isinstance(doc.recommendations, models.ProductsIdDocumentRecommendations)
            assert doc.field_meta.complete is True
            etag = one.headers["ETag"]
            again = await endpoints.get_products_id.asyncio_detailed(
                42, client=plain, if_none_match=etag
            )
            assert again.status_code == 304 and again.parsed is None
            missing = await endpoints.get_products_id.asyncio_detailed(999_999, client=plain)
            assert missing.status_code == 404
            assert isinstance(missing.parsed, models.ErrorBody)
            assert missing.parsed.error.outcome == models.ErrorBodyErrorOutcome.NOT_FOUND

            listing = await endpoints.get_products.asyncio_detailed(
                client=plain, ids=[1, 2, 999_999]
            )
            assert listing.status_code == 200 and isinstance(
                listing.parsed, models.ProductsDocument
            )
            first, second, gone = listing.parsed.items
            assert isinstance(first, models.ProductsIdDocument) and first.product.id == 1
            assert isinstance(second, models.ProductsIdDocument) and gone is None
            assert isinstance(listing.parsed.field_meta, models.ListingMeta)
            category = doc.product.category
            by_slug = await endpoints.get_categories_slug_products.asyncio_detailed(
                category, client=plain
            )
            assert by_slug.status_code == 200
            assert (
                all(i is None or i.product.category == category for i in by_slug.parsed.items)
                and by_slug.parsed.items
            )

            health = await operations.healthz_healthz_get.asyncio_detailed(client=plain)
            assert isinstance(health.parsed, models.Health) and health.parsed.status == "ok"
            ready = await operations.readyz_readyz_get.asyncio_detailed(client=plain)
            assert isinstance(ready.parsed, models.Ready)
            assert set(ready.parsed.sources.additional_properties) == {
                "catalog",
                "pricing",
                "inventory",
                "reviews",
                "recs",
            }
            metrics = await operations.handle_metrics_get.asyncio_detailed(client=plain)
            assert metrics.status_code == 200 and b"gateway_" in metrics.content

            effective = await admin.config_admin_config_get.asyncio_detailed(client=authed)
            assert isinstance(effective.parsed, models.EffectiveConfig)
            assert effective.parsed.file == "gateway.yaml"
            refused = await admin.config_admin_config_get.asyncio_detailed(client=anonymous)
            assert refused.status_code == 401 and isinstance(refused.parsed, models.Unauthorized)
            sources = await admin.sources_admin_sources_get.asyncio_detailed(client=authed)
            assert isinstance(sources.parsed, models.SourcesReport)
            assert "pricing" in sources.parsed.sources.additional_properties


# --- live answers against the document (openapi-core) ------------------------------------------


@dataclass
class Asked:
    """A GET the gateway answered, as openapi-core reads a request."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "get"
    body: bytes | None = None
    content_type: str = ""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        self.host_url = f"{parts.scheme}://{parts.netloc}"
        self.path = parts.path
        query: dict[str, list[str]] = {}
        for pair in filter(None, parts.query.split("&")):
            key, _, value = pair.partition("=")
            query.setdefault(key, []).append(value)
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(query), header=Headers(self.headers)
        )


@dataclass
class Answered:
    """The gateway's answer, as openapi-core reads a response."""

    status_code: int
    headers: Headers
    data: bytes

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", ""))


class Checker:
    """Asks the live gateway and validates each answer against the document it serves."""

    def __init__(self, http: aiohttp.ClientSession, url: str, spec: dict[str, Any]) -> None:
        self.http = http
        self.url = url
        self.openapi = OpenAPI.from_dict(spec)
        self.seen: set[int] = set()

    async def check(self, path: str, **headers: str) -> Answered:
        """GET `path`, validate its answer (raising openapi-core's error), and return it."""
        asked = Asked(self.url + path, headers)
        async with self.http.get(asked.url, headers=headers) as resp:
            answer = Answered(resp.status, Headers(list(resp.headers.items())), await resp.read())
        self.openapi.validate_response(asked, answer)
        self.seen.add(answer.status_code)
        return answer


@asynccontextmanager
async def checking(
    sims: Simulators, catalog_dsn: str, http: aiohttp.ClientSession, edit: Mapping[str, str]
) -> AsyncIterator[Checker]:
    async with gateway(sims, catalog_dsn, edit) as url:
        async with http.get(f"{url}/openapi.json") as resp:
            spec = await resp.json()
        yield Checker(http, url, spec)


def failing(sims: Simulators, name: str, **behaviour: float) -> None:
    sims.behaviour(name).update({"error_rate": 0, "hang_rate": 0, **behaviour})


async def test_live_answers_of_every_status_meet_the_document(
    sims: Simulators, catalog_dsn: str, http: aiohttp.ClientSession
) -> None:
    async with checking(sims, catalog_dsn, http, {}) as c:
        fresh = await c.check("/products/42")
        assert fresh.headers["X-Cache"] == "MISS" and fresh.headers["X-Gateway-Complete"] == "true"
        hit = await c.check("/products/42", **{"X-Request-ID": "typed-1"})
        assert hit.headers["X-Cache"] == "HIT" and hit.headers["X-Request-ID"] == "typed-1"
        same = await c.check("/products/42", **{"If-None-Match": fresh.headers["ETag"]})
        assert same.status_code == 304
        explained = await c.check(
            "/products/42", **{"X-Gateway-Explain": "1", "Authorization": f"Bearer {TOKEN}"}
        )
        assert b'"_explain"' in explained.data and "ETag" not in explained.headers
        assert (await c.check("/products/999999")).status_code == 404
        assert (await c.check("/products/abc")).status_code == 422
        for name in ("pricing", "inventory", "reviews", "recs"):
            failing(sims, name, error_rate=1)
        partial = await c.check("/products/43")
        assert partial.status_code == 200 and partial.headers["X-Gateway-Complete"] == "false"
        assert orjson.loads(partial.data)["_meta"]["sources"] == {
            "price": "error",
            "stock": "error",
            "reviews": "error",
            "recommendations": "error",
        }
        listed = await c.check("/products?ids=1,43,999999")
        assert orjson.loads(listed.data)["items"][2] is None
        assert (await c.check("/products?ids=x")).status_code == 422
        assert (await c.check("/categories/none-such/products")).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await c.check(path)).status_code == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await c.check("/admin/config", **auth)).status_code == 200
        assert (await c.check("/admin/sources", **auth)).status_code == 200
        assert (await c.check("/admin/config")).status_code == 401
    assert {200, 304, 401, 404, 422} <= c.seen


PRICE_REQUIRED = {
    "fallback: {currency: USD, amount: null}": "required: true",
    # Expired after a second and no stale-while-revalidate: a failure serves it stale-if-error.
    "cache: {ttl_s: 60, partial_ttl_s: 5,": "cache: {ttl_s: 1, partial_ttl_s: 1,",
    "stale_while_revalidate_s: 300,": "stale_while_revalidate_s: 0,",
}


async def test_failed_required_calls_and_stale_answers_meet_the_document(
    sims: Simulators, catalog_dsn: str, http: aiohttp.ClientSession
) -> None:
    async with checking(sims, catalog_dsn, http, PRICE_REQUIRED) as c:
        assert (await c.check("/products/7")).status_code == 200
        failing(sims, "pricing", error_rate=1)
        stale = None
        for _ in range(40):  # until the entry expires (its ttl is one second)
            answer = await c.check("/products/7")
            if b"stale_age_s" in answer.data:
                stale = answer
                break
            await asyncio.sleep(0.1)
        assert stale is not None and stale.status_code == 200
        assert stale.headers["Cache-Control"] == "no-store"
        failed = await c.check("/products/8")
        assert failed.status_code == 502, failed.data
        assert orjson.loads(failed.data)["error"]["outcome"] == "error"
        failing(sims, "pricing", hang_rate=1)
        timed_out = await c.check("/products/9")
        assert timed_out.status_code == 504, timed_out.data
        failing(sims, "pricing", error_rate=1)
        for product_id in range(10, 70):  # until the breaker opens (20 calls, half failed)
            if (await c.check(f"/products/{product_id}")).status_code == 503:
                break
        assert 503 in c.seen
        listed = await c.check("/products?ids=1,2")
        assert orjson.loads(listed.data)["items"] == [None, None]
        assert orjson.loads(listed.data)["_meta"]["complete"] is False
    assert {200, 502, 503, 504} <= c.seen


def test_a_path_the_schema_does_not_describe_is_untyped() -> None:
    from gateway.edge.openapi import walk

    declared = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
            },
            {"type": "null"},
        ]
    }
    assert walk(declared, ("tags", 0)) == {"type": "string"}
    assert walk(declared, ()) == declared  # the whole value keeps its null
    assert walk(declared, ("colour",)) == {}
    assert walk(declared, ("tags", "x")) == {}
    assert walk(None, ("tags",)) == {}
    assert walk({"anyOf": [{"type": "string"}, {"type": "integer"}]}, ("x",)) == {}
