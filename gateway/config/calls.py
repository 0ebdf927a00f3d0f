"""How a call of each family of kinds (http, sql) renders into its target and parameters, and
what its config may hold: the functions the rows of `gateway.config.kinds` point to."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from gateway.config.fieldpath import Loc
from gateway.core import templates

Scope = Mapping[str, Any]
"""What a call's templates read: path parameters and the results of the calls it waits for."""

Render = Callable[[Scope], tuple[str, Mapping[str, Any]]]
"""Scope -> a call's target (URL path or SQL text) and its parameters."""


class CallSpec(Protocol):
    """The fields of a call's config that its source kind reads."""

    @property
    def path(self) -> str | None: ...
    @property
    def query(self) -> str | Mapping[str, str] | None: ...
    @property
    def args(self) -> Mapping[str, str]: ...
    @property
    def one(self) -> bool: ...


def http_render(call: CallSpec) -> Render:
    """Return the renderer of an http call: its path and query values filled from the scope."""
    path = templates.parse(call.path or "/")
    query = (
        [(k, templates.parse(v)) for k, v in call.query.items()]
        if isinstance(call.query, Mapping)
        else []
    )
    if not query and not path.refs:
        fixed = path.render_path({})
        return lambda scope: (fixed, {})

    def render(scope: Scope) -> tuple[str, Mapping[str, Any]]:
        return path.render_path(scope), {k: t.render_value(scope) for k, t in query}

    return render


def http_texts(call: CallSpec) -> list[str]:
    """Return the templates of an http call: its path and its query values."""
    return [call.path or "", *(call.query.values() if isinstance(call.query, Mapping) else ())]


def check_http_call(cat: Loc, call: CallSpec, params: set[str]) -> list[tuple[Loc, str]]:
    """Return the problems of an http call's fields: a path, a mapping query, no sql fields."""
    found: list[tuple[Loc, str]] = []
    if call.path is None:
        found.append(((*cat, "path"), "an http call needs a path"))
    elif not call.path.startswith("/"):
        found.append(((*cat, "path"), "must start with /"))
    if isinstance(call.query, str):
        found.append(((*cat, "query"), "an http call's query is a mapping of values"))
    if call.one or call.args:
        found.append(((*cat, "one" if call.one else "args"), "only sql calls take one and args"))
    return found


def keep_pyformat(sql: str) -> tuple[str, tuple[str, ...]]:
    """Return SQL text as the driver takes it (`%(name)s`) and its parameter names."""
    return sql, tuple(templates.sql_param_names(sql))


def sql_render(translate: Callable[[str], tuple[str, Sequence[str]]], call: CallSpec) -> Render:
    """Return the renderer of a SQL call: its text in the driver's placeholder syntax (made
    once, here) and its parameters by name, in the order the translated text binds them."""
    sql, names = translate(call.query if isinstance(call.query, str) else "")
    args = {k: templates.parse(v) for k, v in call.args.items()}

    def render(scope: Scope) -> tuple[str, Mapping[str, Any]]:
        return sql, {n: args[n].render_value(scope) if n in args else scope[n] for n in names}

    return render


def sql_texts(call: CallSpec) -> list[str]:
    """Return the templates of a sql call: its args (its text binds values, never templates)."""
    return list(call.args.values())


def check_sql_call(cat: Loc, call: CallSpec, params: set[str]) -> list[tuple[Loc, str]]:
    """Return the problems of a sql call: a query string whose placeholders all name a value."""
    found: list[tuple[Loc, str]] = []
    if not isinstance(call.query, str):
        return [((*cat, "query"), "a sql call needs a query string")]
    if call.path is not None:
        found.append(((*cat, "path"), "a sql call takes a query, not a path"))
    for placeholder in templates.sql_param_names(call.query):
        if placeholder not in params and placeholder not in call.args:
            found.append(
                (
                    (*cat, "query"),
                    f"placeholder %({placeholder})s names no path parameter and no entry of args",
                )
            )
    if "{" in call.query and templates.parse(call.query).refs:
        found.append(
            ((*cat, "query"), "SQL text cannot hold templates; bind values with %(name)s and args")
        )
    return found
