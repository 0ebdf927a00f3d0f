"""Typed call results: `schema:` / `schema_file:` checked where they are written, narrowed by
`select` and made nullable by a null fallback, and `validate: true` turning a result that
breaks its schema into that call's `error` (reason `schema`), against real loopback servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest

from gateway import cli
from gateway.config import loader
from gateway.core.executor import execute
from gateway.core.plan import CallPlan, build_plans, open_upstream
from gateway.demo.simulator import UpstreamServer, json_body
from tests.config_files import problems
from tests.serving import ROOT, product_view_config, serving_config

PRODUCT_SCHEMA = (
    "{type: object, required: [id, name], "
    "properties: {id: {type: integer}, name: {type: string}, tags: {type: array}}}"
)


def config(base_url: str = "http://127.0.0.1:9", *, price: str = "", product: str = "") -> str:
    """Return a two-call config: a required `product` and an optional `price`, each with extra
    lines (indented under the call) appended."""
    return f"""\
version: 1
sources:
  shop: {{kind: http, base_url: "{base_url}", timeout_ms: 500}}
endpoints:
  - path: /products/{{id:int}}
    deadline_ms: 1000
    calls:
      product:
        source: shop
        path: /products/{{id}}
        required: true
{product}
      price:
        source: shop
        path: /prices/{{id}}
{price}
"""


def calls(text: str, file: str = "gw.yaml") -> dict[str, CallPlan]:
    plan = build_plans(loader.loads(text, file, {}).config)[0]
    return {cp.name: cp for cp in plan.calls}


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# --- where a schema is written, and what is wrong with it -------------------------------------


def test_schema_and_schema_file_together_are_refused_at_the_call() -> None:
    text = config(product="        schema: {type: object}\n        schema_file: p.json")
    (found,) = problems(text)
    assert found.startswith(f"gw.yaml:{line_of(text, 'product:')}: endpoints.0.calls.product:")
    assert "not both" in found


def test_a_schema_file_is_read_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    schema = {"type": "object", "properties": {"amount": {"type": "number"}}}
    (tmp_path / "schemas" / "price.json").write_text(json.dumps(schema))
    (tmp_path / "product.yaml").write_text(PRODUCT_SCHEMA)
    text = config(
        product="        schema_file: product.yaml",
        price="        schema_file: schemas/price.json\n        fallback: omit",
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    plan = build_plans(loader.load(path).config)[0]
    by_name = {cp.name: cp for cp in plan.calls}
    assert by_name["price"].result_schema == schema
    assert by_name["product"].result_schema is not None
    assert by_name["product"].result_schema["required"] == ["id", "name"]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "cannot read: No such file or directory"),
        ("{type: [", "not JSON or YAML"),
        ("[1, 2]", "holds a mapping"),
        (b"\xff\xfe", "not JSON or YAML"),
    ],
)
def test_a_schema_file_that_cannot_be_read_is_a_problem_at_its_line(
    tmp_path: Path, content: str | bytes | None, said: str
) -> None:
    if isinstance(content, bytes):
        (tmp_path / "s.json").write_bytes(content)
    elif content is not None:
        (tmp_path / "s.json").write_text(content)
    text = config(price="        schema_file: s.json")
    (found,) = problems(text, str(tmp_path / "gateway.yaml"))
    at = f":{line_of(text, 'schema_file')}: endpoints.0.calls.price.schema_file: s.json: "
    assert at in found and said in found


def test_an_invalid_json_schema_is_a_problem_where_it_is_written(tmp_path: Path) -> None:
    inline = config(product="        schema: {type: objekt}")
    (found,) = problems(inline)
    assert found.startswith(
        f"gw.yaml:{line_of(inline, 'schema:')}: endpoints.0.calls.product.schema"
    )
    assert "not a valid JSON Schema" in found
    (tmp_path / "bad.json").write_text('{"minimum": "three"}')
    in_file = config(product="        schema_file: bad.json")
    (found,) = problems(in_file, str(tmp_path / "gateway.yaml"))
    assert f":{line_of(in_file, 'schema_file')}: endpoints.0.calls.product.schema_file:" in found
    assert "not a valid JSON Schema" in found


def test_a_remote_reference_is_refused_and_never_fetched() -> None:
    text = config(product='        schema: {$ref: "http://127.0.0.1:9/schema.json"}')
    (found,) = problems(text)
    assert "endpoints.0.calls.product.schema: not a valid JSON Schema" in found


def test_a_fallback_value_must_meet_the_schema_at_the_fallback_line() -> None:
    schema = "        schema: {type: object, properties: {amount: {type: number}}}\n"
    bad = config(price=schema + '        fallback: {amount: "free"}')
    (found,) = problems(bad)
    assert found.startswith(
        f"gw.yaml:{line_of(bad, 'fallback')}: endpoints.0.calls.price.fallback:"
    )
    assert "['amount']" in found and "not of type" in found
    for fine in ("{amount: 0}", "null", "omit"):
        loader.loads(config(price=schema + f"        fallback: {fine}"), "gw.yaml", {})


def test_a_fallback_is_checked_against_the_schema_as_select_narrows_it() -> None:
    schema = (
        "        schema: {type: object, required: [amount, currency],\n"
        "                 properties: {amount: {type: number}, currency: {type: string}}}\n"
        "        select: [amount]\n"
    )
    loader.loads(config(price=schema + "        fallback: {amount: 0}"), "gw.yaml", {})


def test_validate_without_a_schema_is_refused() -> None:
    text = config(price="        validate: true")
    (found,) = problems(text)
    assert found.startswith(
        f"gw.yaml:{line_of(text, 'validate')}: endpoints.0.calls.price.validate"
    )


# --- gateway check --strict -------------------------------------------------------------------


def test_check_strict_lists_each_call_without_a_schema_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = config(product=f"        schema: {PRODUCT_SCHEMA}")
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    assert cli.check(str(path)) == 0
    capsys.readouterr()
    assert cli.check(str(path), strict=True) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"{path}:{line_of(text, 'price:')}: endpoints.0.calls.price: declares no schema: "
        "its result is untyped ({}) in /openapi.json"
    ]


def test_the_shipped_config_passes_check_strict(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.check(str(ROOT / "gateway.yaml"), strict=True) == 0
    assert cli.check(str(ROOT / "gateway" / "example.yaml"), strict=True) == 0


# --- result_schema: what the document holds ---------------------------------------------------


def test_result_schema_is_narrowed_by_select_and_nullable_under_a_null_fallback() -> None:
    obj = (
        "        schema: {type: object, required: [a, b], additionalProperties: false,\n"
        "                 properties: {a: {type: integer}, b: {type: string}}}\n"
        "        select: [a]\n"
    )
    narrowed = {
        "type": "object",
        "required": ["a"],
        "additionalProperties": False,
        "properties": {"a": {"type": "integer"}},
    }
    by_fallback = {
        "": {"anyOf": [narrowed, {"type": "null"}]},  # the default fallback is null
        "        fallback: null": {"anyOf": [narrowed, {"type": "null"}]},
        "        fallback: omit": narrowed,
        "        fallback: {a: 1}": narrowed,
    }
    for fallback, expected in by_fallback.items():
        assert calls(config(price=obj + fallback))["price"].result_schema == expected, fallback
    product = calls(config(product=obj))["product"]  # required: it never holds a fallback
    assert product.result_schema == narrowed


def test_result_schema_narrows_the_items_of_an_array() -> None:
    text = config(
        price="        schema: {type: array, items: {type: object, required: [a, b],\n"
        "                 properties: {a: {type: integer}, b: {type: string}}}}\n"
        "        select: [b]\n        fallback: []"
    )
    assert calls(text)["price"].result_schema == {
        "type": "array",
        "items": {"type": "object", "required": ["b"], "properties": {"b": {"type": "string"}}},
    }


def test_a_call_without_a_schema_has_none_and_no_validator() -> None:
    cp = calls(config())["price"]
    assert cp.result_schema is None and cp.validator is None


def test_validate_is_the_endpoints_unless_the_call_says_otherwise() -> None:
    schema = "        schema: {type: object}\n"
    on_endpoint = config(product=schema, price=schema + "        validate: false").replace(
        "deadline_ms: 1000", "deadline_ms: 1000\n    validate: true"
    )
    by_name = calls(on_endpoint)
    assert by_name["product"].validator is not None
    assert by_name["price"].validator is None
    assert calls(config(price=schema + "        validate: true"))["price"].validator is not None
    assert calls(config(price=schema))["price"].validator is None


# --- validate: true, at run time --------------------------------------------------------------

GOOD_PRODUCT = {"id": 7, "name": "Lamp"}
VALIDATED = {
    "product": f"        schema: {PRODUCT_SCHEMA}\n        validate: true",
    "price": "        schema: {type: object, required: [amount],\n"
    "                 properties: {amount: {type: number}, currency: {type: string}}}\n"
    "        select: [amount, currency]\n"
    "        fallback: {amount: 0}\n        validate: true",
}


async def test_a_result_that_breaks_its_schema_is_the_calls_error_with_reason_schema() -> None:
    async with UpstreamServer() as server:
        server.route("/products/", json_body(GOOD_PRODUCT))
        server.route("/prices/", json_body({"amount": "9.50", "currency": "EUR"}))  # a string
        loaded = loader.loads(config(server.url, **VALIDATED), "gw.yaml", {})
        plan = build_plans(loaded.config)[0]
        upstream = await open_upstream("shop", loaded.config.sources["shop"])
        try:
            composite = await execute(plan, {"shop": upstream.call}, {"id": 7})
        finally:
            await upstream.close()
    price = composite.results["price"]
    assert (price.outcome, price.detail, price.value) == ("error", "schema", None)
    assert composite.results["product"].outcome == "ok"
    assert composite.failed is None


async def test_a_wrong_answer_takes_the_fallback_and_a_required_one_is_a_502(
    http: aiohttp.ClientSession,
) -> None:
    async with UpstreamServer() as server:
        server.route("/products/1", json_body(GOOD_PRODUCT))
        server.route("/products/2", json_body({"id": "2", "name": "Kettle"}))  # id: a string
        server.route("/prices/", json_body({"amount": "free", "currency": "EUR", "extra": 1}))
        loaded = loader.loads(config(server.url, **VALIDATED), "gw.yaml", {})
        async with serving_config(loaded) as url:
            async with http.get(f"{url}/products/1") as resp:
                partial = (resp.status, await resp.json())
            async with http.get(f"{url}/products/2") as resp:
                failed = (resp.status, await resp.json())
    status, doc = partial
    assert status == 200
    assert doc["product"] == GOOD_PRODUCT
    assert doc["price"] == {"amount": 0}  # its fallback
    assert doc["_meta"] == {"complete": False, "sources": {"price": "error"}}
    status, doc = failed
    assert status == 502
    assert doc["error"]["call"] == "product" and doc["error"]["outcome"] == "error"


async def test_without_validate_a_wrong_answer_passes_through() -> None:
    async with UpstreamServer() as server:
        server.route("/products/", json_body({"id": "x"}))
        server.route("/prices/", json_body({"amount": "free"}))
        text = config(server.url, product=f"        schema: {PRODUCT_SCHEMA}")
        loaded = loader.loads(text, "gw.yaml", {})
        plan = build_plans(loaded.config)[0]
        upstream = await open_upstream("shop", loaded.config.sources["shop"])
        try:
            composite = await execute(plan, {"shop": upstream.call}, {"id": 1})
        finally:
            await upstream.close()
    assert composite.results["product"].value == {"id": "x"}
    assert composite.complete


# --- the shipped config against the demo's real answers ---------------------------------------


async def test_every_demo_answer_meets_the_shipped_schemas(
    product_env: dict[str, str], redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    loaded = product_view_config(
        product_env, redis_prefix, {"deadline_ms: 300": "deadline_ms: 300\n    validate: true"}
    )
    plan = build_plans(loaded.config)[0]
    validators = {
        cp.name: jsonschema_rs.validator_for(dict(cp.result_schema or {"not": {}}))
        for cp in plan.calls
    }
    async with serving_config(loaded) as url:
        for product_id in range(1, 41):  # the demo's bodies cycle through every shape by id
            async with http.get(f"{url}/products/{product_id}") as resp:
                assert resp.status == 200, product_id
                doc: dict[str, Any] = await resp.json()
            assert doc["_meta"] == {"complete": True, "sources": {}}, (product_id, doc)
            for name, validator in validators.items():
                validator.validate(doc[name])
