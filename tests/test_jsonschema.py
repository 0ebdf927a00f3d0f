"""`gateway schema`: the JSON Schema of gateway.yaml takes every config the project ships or
shows, refuses broken ones as the loader does, and describes every field the models have."""

from __future__ import annotations

import copy
import io
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import jsonschema_rs
import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

from gateway.config import loader
from gateway.config.jsonschema import INTERPOLATION, SCHEMA_ID, config_schema, print_schema
from gateway.config.schema import EndpointConfig, GatewayConfig
from gateway.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = config_schema()
VALIDATOR = jsonschema_rs.Draft202012Validator(SCHEMA)
SHIPPED = (ROOT / "gateway.yaml").read_text()
BENCH = sorted((ROOT / "bench").glob("*.yaml"))


def read_yaml(text: str) -> Any:
    """Return YAML data as the gateway's loader sees it before interpolation: keys are names
    (`on:` is the text "on", not YAML 1.1's true)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    todo = [node]
    while todo:  # bounded: each node of the finite tree is visited once
        n = todo.pop()
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                key.tag = "tag:yaml.org,2002:str"
                todo.append(value)
        elif isinstance(n, yaml.SequenceNode):
            todo.extend(n.value)
    return yaml.SafeLoader("").construct_document(node)


def errors(data: Any, validator: Any = VALIDATOR) -> list[str]:
    """Return each problem as `/json/pointer: message` (a message's quoted instance cut short)."""
    return [
        "/" + "/".join(map(str, e.instance_path)) + ": " + e.message[-200:]
        for e in validator.iter_errors(data)
    ]


def models(cls: type[BaseModel]) -> set[type[BaseModel]]:
    """Return `cls` and every model its fields hold, however nested in unions and containers."""
    found: set[type[BaseModel]] = set()
    todo: list[Any] = [cls]
    while todo:  # bounded: a model is expanded once, and annotations are finite trees
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in found:
                found.add(t)
                todo.extend(f.annotation for f in t.model_fields.values())
        else:
            todo.extend(get_args(t))
    return found


MODELS = models(GatewayConfig)


def keys_of(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def properties(node: Any, at: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, schema) for every property declared anywhere in the schema."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties":
                for name, child in value.items():
                    yield f"{at}.{name}", child
                    yield from properties(child, f"{at}.{name}")
            else:
                yield from properties(value, f"{at}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from properties(child, f"{at}/{i}")


# --- the schema is complete and well formed --------------------------------------------------


def test_the_schema_is_valid_draft_2020_12_with_an_id() -> None:
    jsonschema_rs.meta.validate(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"] == SCHEMA_ID


def test_print_schema_writes_the_schema_as_json() -> None:
    out = io.StringIO()
    print_schema(out)
    assert out.getvalue().endswith("}\n")
    assert json.loads(out.getvalue()) == SCHEMA


def test_every_model_is_a_definition_with_exactly_its_fields_and_no_others() -> None:
    defs = SCHEMA["$defs"]
    assert {m.__name__ for m in MODELS} - {"GatewayConfig"} <= set(defs)
    assert {"HttpSourceConfig", "SqlSourceConfig", "CallConfig", "ShapeField"} <= set(defs)
    for model in MODELS:
        node = SCHEMA if model is GatewayConfig else defs[model.__name__]
        assert set(node["properties"]) == keys_of(model), model.__name__
        assert node["additionalProperties"] is False, model.__name__


def test_top_level_endpoint_and_call_keys_are_the_models_fields_aliases_as_written() -> None:
    assert set(SCHEMA["properties"]) == keys_of(GatewayConfig)
    endpoint = set(SCHEMA["$defs"]["EndpointConfig"]["properties"])
    assert endpoint == keys_of(EndpointConfig)
    assert "list" in endpoint and "listing" not in endpoint
    assert "from" in SCHEMA["$defs"]["ShapeField"]["properties"]
    assert set(SCHEMA["required"]) == {"sources", "endpoints"}


def test_every_property_has_a_description_and_examples() -> None:
    missing = []
    for where, prop in properties(SCHEMA):
        if not prop.get("description", "").strip():
            missing.append(f"{where}: description")
        if prop.get("type") != "null" and not prop.get("examples"):  # only null: nothing to show
            missing.append(f"{where}: examples")
    assert not missing, missing
    assert all(d.get("description") for d in SCHEMA["$defs"].values())


def test_every_example_is_valid_where_it_is_given() -> None:
    wrong = []
    for where, prop in properties(SCHEMA):
        one = jsonschema_rs.Draft202012Validator({**prop, "$defs": SCHEMA["$defs"]})
        wrong += [
            f"{where}: {example!r}"
            for example in prop.get("examples", [])
            if not one.is_valid(example)
        ]
    for model in MODELS:  # the models' own validators too, for examples with no reference
        for field in model.model_fields.values():
            assert field.annotation is not None
            adapter = TypeAdapter(field.annotation)
            for example in field.examples or ():
                if "${" not in json.dumps(example):
                    adapter.validate_python(example)
    assert not wrong, wrong


def test_interpolation_pattern_is_the_loaders() -> None:
    assert INTERPOLATION == loader._ENV.pattern


# --- what the project ships and shows validates ----------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["gateway.yaml", "gateway/example.yaml", *(str(p.relative_to(ROOT)) for p in BENCH)],
)
def test_shipped_config_files_validate(name: str) -> None:
    assert errors(read_yaml((ROOT / name).read_text())) == []


def without_required(target: str | None) -> Any:
    """Return a validator of fragments: the top level (None) or one definition, nothing
    required at its own level."""
    schema = copy.deepcopy(SCHEMA)
    if target is not None:
        schema = {
            "$schema": SCHEMA["$schema"],
            "$defs": schema["$defs"],
            "$ref": f"#/$defs/{target}",
        }
    (schema if target is None else schema["$defs"][target])["required"] = []
    return jsonschema_rs.Draft202012Validator(schema)


def doc_blocks() -> list[tuple[str, str]]:
    """Return (FILE:LINE, text) of every ```yaml block in the README and docs/."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.M | re.S):
            line = text.count("\n", 0, m.start()) + 2
            out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return out


def config_blocks() -> list[tuple[str, str, str | None]]:
    """Return the doc blocks that are config: (where, text, what): a whole gateway.yaml
    ("file"), part of one's top level (None), or lines of an endpoint ("EndpointConfig")."""
    out: list[tuple[str, str, str | None]] = []
    for where, text in doc_blocks():
        first = re.search(r"^(\s*)([A-Za-z_]+):", text, re.M)
        if first is None:
            continue
        indent, key = first.groups()
        if not indent and key in SCHEMA["properties"]:
            tops = set(re.findall(r"^([A-Za-z_]+):", text, re.M))
            what = "file" if {"sources", "endpoints"} <= tops else None
            out.append((where, text, what))
        elif indent and key in keys_of(EndpointConfig):
            out.append((where, textwrap.dedent(text), "EndpointConfig"))
    return out


def test_the_readme_shows_a_whole_gateway_yaml() -> None:
    assert any(w.startswith("README.md") and what == "file" for w, _, what in config_blocks())


@pytest.mark.parametrize(
    ("where", "text", "what"), [pytest.param(*block, id=block[0]) for block in config_blocks()]
)
def test_config_examples_in_the_docs_validate(where: str, text: str, what: str | None) -> None:
    validator = VALIDATOR if what == "file" else without_required(what)
    assert errors(read_yaml(text), validator) == [], where


# --- the schema refuses what the loader refuses, and takes `${...}` where it does -------------


SUBS: dict[str, tuple[str, str, bool]] = {
    # name: (old text of the shipped file, new text, whether the loader takes it)
    "interpolated int": ("    timeout_ms: 150\n", "    timeout_ms: ${CATALOG_MS:-150}\n", True),
    "interpolated bool": ("        one: true\n", "        one: ${ONE:-true}\n", True),
    "interpolated float": ("failure_ratio: 0.5", "failure_ratio: '${RATIO:-0.5}'", True),
    "interpolated kind": ("    kind: http\n", "    kind: ${PRICING_KIND:-http}\n", True),
    "interpolated pattern": ("ids: {query: ids", "ids: {query: '${IDS:-ids}'", True),
    "interpolated retry on": ("on: [timeout,", "on: ['${RETRY_ON:-timeout}',", True),
    "unknown key": (
        "    pool: {min: 2, max: 20}\n",
        "    pool: {min: 2, max: 20, size: 3}\n",
        False,
    ),
    "unknown top-level key": ("version: 1\n", "version: 1\nlogging: {}\n", False),
    "wrong type": ("    timeout_ms: 150\n", "    timeout_ms: fast\n", False),
    "wrong list type": ("select: [available]", "select: available", False),
    "bad kind": ("    kind: http\n", "    kind: grpc\n", False),
    "no kind": ("    kind: sql\n", "", False),
    "version 2": ("version: 1\n", "version: 2\n", False),
    "out of range": ("    deadline_ms: 300\n", "    deadline_ms: 0\n", False),
    "retry on a status never retried": ("502, 503, 504]", "502, 503, 418]", False),
    "field name, not its alias": ("    list: {item:", "    listing: {item:", False),
    "malformed reference": ("    timeout_ms: 150\n", "    timeout_ms: $CATALOG_MS\n", False),
    "required key missing": ("        source: pricing\n", "", False),
}


@pytest.mark.parametrize("name", SUBS)
def test_schema_and_loader_agree_on_an_edit_of_the_shipped_file(name: str) -> None:
    old, new, loads = SUBS[name]
    assert SHIPPED.count(old) >= 1, old
    text = SHIPPED.replace(old, new, 1)
    try:
        loader.loads(text, "gateway.yaml", {})
        problems = []
    except ConfigError as exc:
        problems = [str(p) for p in exc.problems]
    assert (problems == []) is loads, problems
    assert (errors(read_yaml(text)) == []) is loads, errors(read_yaml(text))


def test_a_known_bad_file_lists_each_problem_where_it_is() -> None:
    text = SHIPPED.replace("    kind: http\n", "    kind: grpc\n", 1).replace(
        "    deadline_ms: 300\n", "    deadline_ms: soon\n    colour: red\n", 1
    )
    found = errors(read_yaml(text))
    assert any(e.startswith("/sources/pricing") for e in found), found
    assert any(e.startswith("/endpoints/0") and "colour" in e for e in found), found
    assert any(e.startswith("/endpoints/0/deadline_ms") for e in found), found


DRAFT_7_WORDS = {
    *("$schema", "$id", "$defs", "$ref", "title", "description", "default", "examples"),
    *("type", "properties", "additionalProperties", "required", "items", "anyOf", "oneOf"),
    *("enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum"),
    *("exclusiveMinimum", "exclusiveMaximum"),
}
"""Keywords draft-07 language servers also know (`$defs` is only reached by `$ref` pointers)."""


def test_the_schema_uses_only_keywords_draft_7_editors_know() -> None:
    used: set[str] = set()
    todo: list[Any] = [SCHEMA]
    while todo:  # bounded: the schema is a finite tree
        node = todo.pop()
        if isinstance(node, dict):
            used |= set(node)
            for key, value in node.items():
                if key in ("properties", "$defs"):
                    todo.extend(value.values())
                elif key not in ("default", "examples", "const", "enum"):
                    todo.append(value)
        elif isinstance(node, list):
            todo.extend(node)
    assert used <= DRAFT_7_WORDS, used - DRAFT_7_WORDS


def _contract_validator() -> Any:
    from gateway.contracts.model import contract_schema

    return jsonschema_rs.validator_for(contract_schema())


CONTRACTS = sorted((ROOT / "tests" / "contracts").glob("*.yaml"))


def test_the_shipped_contract_files_are_found() -> None:
    # Outside the parametrized test: with none found, it would run no case at all.
    assert [p.name for p in CONTRACTS] == ["listing.yaml", "product.yaml"]


@pytest.mark.parametrize("path", CONTRACTS, ids=[p.name for p in CONTRACTS])
def test_every_shipped_contract_file_validates_against_the_contract_schema(path: Path) -> None:
    errors = [
        e.message for e in _contract_validator().iter_errors(yaml.safe_load(path.read_text()))
    ]
    assert not errors, errors


@pytest.mark.parametrize(
    "doc",
    [
        {"endpoint": "/products/{id:int}"},
        {"endpoint": "/p", "cases": [{"name": "x", "request": {"path": "/p"}}]},
        {
            "endpoint": "/p",
            "cases": [
                {
                    "name": "x",
                    "request": {"path": "/p"},
                    "expect": {"status": 200},
                    "upstreams": {"a": {"stat": 1}},
                }
            ],
        },
        {"endpoint": "/p", "cases": [], "extra": 1},
    ],
)
def test_a_broken_contract_file_does_not_validate(doc: dict[str, Any]) -> None:
    assert not _contract_validator().is_valid(doc)
