"""The JSON Schema of gateway.yaml, generated from its pydantic models, for editors' YAML
language servers (`gateway schema > gateway.schema.json`).

The loader replaces `${VAR}` and `${VAR:-default}` in a value's text before it validates, so a
number, a boolean or a constrained string may be written as a reference: wherever a string could
become a valid value, the schema also takes a string holding one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

from gateway.config.schema import GatewayConfig

SCHEMA_ID = "urn:aggregation-gateway:gateway.yaml:v1"

INTERPOLATION = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}"
"""A `${VAR}` or `${VAR:-default}` reference, as the loader finds them."""

_INTERPOLATED = "Interpolated"
_REF = {"$ref": f"#/$defs/{_INTERPOLATED}"}
_ANNOTATIONS = ("description", "default", "examples")


def config_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a gateway.yaml, as the loader reads it."""
    schema = GatewayConfig.model_json_schema(by_alias=True, mode="validation")
    for node in _nodes(schema):
        node.pop("title", None)  # pydantic's "Timeout Ms": the key itself, said again
        node.pop("discriminator", None)  # OpenAPI's, not JSON Schema's; `kind`'s const does it
        if "description" in node:  # a docstring's line breaks are layout; blank lines stay
            node["description"] = re.sub(r"(?<!\n)\n(?!\n)", " ", node["description"])
        default = node.get("default")
        # A scalar default is a fine example; a null, empty or whole-object one says little.
        if "examples" not in node and default not in (None, []) and not isinstance(default, dict):
            node["examples"] = [default]
    schema = _with_interpolation(schema)
    schema.setdefault("$defs", {})[_INTERPOLATED] = {
        "type": "string",
        "pattern": INTERPOLATION,
        "description": "A ${VAR} or ${VAR:-default} reference, replaced before validation.",
        "examples": ["${TIMEOUT_MS:-150}"],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "gateway.yaml",
        **schema,
    }


def print_schema(stream: TextIO) -> None:
    """Write `config_schema()` to `stream` as indented JSON with a final newline."""
    stream.write(json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n")


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Yield every schema object in `node` (itself included), parents before children."""
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key in ("properties", "$defs"):
                for child in value.values():
                    yield from _nodes(child)
            elif key in ("items", "additionalProperties"):
                yield from _nodes(value)
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
                for child in value:
                    yield from _nodes(child)


def _with_interpolation(node: Any, in_union: bool = False) -> Any:
    """Return `node` where each schema a `${...}` string could satisfy also accepts one (in a
    union, the union takes it once, beside its members)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "$defs"):
            out[key] = {name: _with_interpolation(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _with_interpolation(value)
        elif key == "anyOf":
            out[key] = [_with_interpolation(child, in_union=True) for child in value]
        elif key in ("oneOf", "prefixItems"):
            out[key] = [_with_interpolation(child) for child in value]
        else:
            out[key] = value
    if "anyOf" in out:
        if any(_takes_interpolation(member) for member in out["anyOf"]):
            out["anyOf"] = [*out["anyOf"], _REF]
        return out
    if in_union or not _takes_interpolation(out):
        return out
    annotations = {k: out.pop(k) for k in _ANNOTATIONS if k in out}
    return {"anyOf": [out, _REF], **annotations}


def _takes_interpolation(node: dict[str, Any]) -> bool:
    """Whether a string could become a value this (scalar) schema accepts: a number or boolean
    parsed from one, a string with constraints a `${...}` text need not meet, a string choice."""
    if "const" in node or "enum" in node:
        choices = node.get("enum", [node.get("const")])
        return any(isinstance(c, str) for c in choices)
    kind = node.get("type")
    if kind in ("integer", "number", "boolean"):
        return True
    return kind == "string" and any(k in node for k in ("pattern", "minLength", "maxLength"))
