"""Templates: parsed once, rendered so no value can change a URL's structure."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from gateway.core import templates
from gateway.core.templates import Unrenderable
from tests.payloads import HOSTILE


@pytest.mark.parametrize("value", HOSTILE)
def test_a_path_value_stays_one_segment_and_decodes_back(value: str) -> None:
    rendered = templates.parse("/prices/{id}/x").render_path({"id": value})
    assert rendered.startswith("/prices/") and rendered.endswith("/x")
    segment = rendered[len("/prices/") : -len("/x")]
    assert "/" not in segment and "?" not in segment and "#" not in segment
    assert "\r" not in segment and "\n" not in segment
    assert segment not in (".", "..")
    assert unquote(segment) == value


def test_integers_render_as_digits() -> None:
    assert templates.parse("/p/{id}").render_path({"id": -42}) == "/p/-42"
    assert templates.parse("/p/{id}").render_path({"id": True}) == "/p/true"


def test_a_lone_reference_keeps_its_type_and_nested_fields_resolve() -> None:
    scope = {"product": {"category": "lamps", "ids": [7, 9]}, "id": 3}
    assert templates.parse("{id}").render_value(scope) == 3
    assert templates.parse("{product.category}").render_value(scope) == "lamps"
    assert templates.parse("{product.ids.1}").render_value(scope) == 9
    assert templates.parse("c-{product.category}").render_value(scope) == "c-lamps"


@pytest.mark.parametrize(
    "scope",
    [
        {},
        {"product": None},
        {"product": {"category": None}},
        {"product": {"category": {"deep": 1}}},
    ],
)
def test_a_missing_or_non_scalar_value_is_unrenderable(scope: dict[str, object]) -> None:
    with pytest.raises(Unrenderable):
        templates.parse("/r/{product.category}").render_path(scope)


def test_path_parameters_and_sql_placeholders() -> None:
    assert templates.path_params("/a/{id:int}/{slug}") == [("id", "int"), ("slug", "str")]
    assert templates.starlette_path("/a/{id:int}/{slug}") == "/a/{id}/{slug}"
    sql = "SELECT * FROM t WHERE a = %(a)s AND b = %(b)s OR a = %(a)s"
    assert templates.sql_param_names(sql) == ["a", "b"]
    assert templates.sqlite_placeholders(sql) == "SELECT * FROM t WHERE a = :a AND b = :b OR a = :a"
