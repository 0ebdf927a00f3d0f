"""How a call of each family of kinds (http, sql) renders into its target and parameters, and
what its config may hold: the functions the rows of `gateway.config.kinds` point to."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from gateway.config.fieldpath import Loc
from gateway.core import templates

Scope = Mapping[str, Any]
"""What a call's templates read: path parameters and the results of the calls it waits for."""

Render = Callable[[Scope], tuple[str, Mapping[str, Any]]]
"""Scope -> a call's target (URL path or SQL text) and its parameters."""

BatchRender = Callable[[Sequence[Any]], tuple[str, Mapping[str, Any]]]
"""The items' ids -> a batch request's target (URL path or SQL text) and its parameters."""

STAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\*\}")
"""`{id*}`: the list of a batch's ids, in an http batch's path or query."""
SQL_STAR = re.compile(r"%\(([A-Za-z_][A-Za-z0-9_]*)\*\)s")
"""`%(id*)s`: the list of a batch's ids, in a sql batch's query."""


class BatchSpec(Protocol):
    """The fields of a call's `batch:` block that its source kind reads."""

    @property
    def path(self) -> str | None: ...
    @property
    def query(self) -> str | Mapping[str, str] | None: ...


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
    @property
    def model_fields_set(self) -> set[str]: ...


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
    """Return the problems of an http call's fields: a path, a mapping query, no sql fields
    (`max_rows` only when it was written: its default is the model's)."""
    found: list[tuple[Loc, str]] = []
    if call.path is None:
        found.append(((*cat, "path"), "an http call needs a path"))
    elif not call.path.startswith("/"):
        found.append(((*cat, "path"), "must start with /"))
    if isinstance(call.query, str):
        found.append(((*cat, "query"), "an http call's query is a mapping of values"))
    if call.one or call.args:
        found.append(((*cat, "one" if call.one else "args"), "only sql calls take one and args"))
    if "max_rows" in call.model_fields_set:
        found.append(((*cat, "max_rows"), "only sql calls take max_rows"))
    return found


def http_batch_render(batch: BatchSpec, param: str) -> BatchRender:
    """Return the renderer of an http batch: `{id*}` in the path is the ids, each one
    percent-encoded as a path segment, joined by commas; a query value `{id*}` is the ids as a
    tuple, which the adapter encodes value by value and joins by commas."""
    star = "{" + param + "*}"
    pieces = (batch.path or "/").split(star)
    query = (
        [(k, v == star, v) for k, v in (batch.query or {}).items()]
        if isinstance(batch.query, Mapping)
        else []
    )

    def render(ids: Sequence[Any]) -> tuple[str, Mapping[str, Any]]:
        path = ",".join(templates.path_segment(i) for i in ids).join(pieces)
        return path, {k: tuple(ids) if starred else v for k, starred, v in query}

    return render


def check_http_batch(cat: Loc, batch: BatchSpec, param: str) -> list[tuple[Loc, str]]:
    """Return the problems of an http batch: a path, and `{id*}` as its only template."""
    star = "{" + param + "*}"
    found: list[tuple[Loc, str]] = []
    if batch.path is None or not batch.path.startswith("/"):
        found.append(((*cat, "path"), "an http batch needs a path starting with /"))
    if isinstance(batch.query, str):
        found.append(((*cat, "query"), "an http batch's query is a mapping of values"))
    query = batch.query if isinstance(batch.query, Mapping) else {}
    uses = 0
    for field, text in [("path", batch.path or ""), *(("query", v) for v in query.values())]:
        uses += text.count(star)
        rest = text.replace(star, "")
        if field == "query" and star in text and text != star:
            found.append(((*cat, field), f"a query value is {star} alone, or literal text"))
        for ref in [*STAR.findall(rest), *(r.text for r in templates.parse(rest).refs)]:
            found.append(
                (
                    (*cat, field),
                    f"a batch can only use {star} (the item endpoint's id), not {{{ref}}}",
                )
            )
    if not uses and batch.path is not None:
        found.append(((*cat, "path"), f"a batch must send its ids: use {star} in path or query"))
    return found


def sql_batch_render(
    translate: Callable[[str], tuple[str, Sequence[str]]], batch: BatchSpec, param: str
) -> BatchRender:
    """Return the renderer of a sql batch: `%(id*)s` becomes `(%(_id_0)s, ...)`, one bound
    placeholder per id, translated to the driver's syntax once per chunk size."""
    text = batch.query if isinstance(batch.query, str) else ""
    made: dict[int, tuple[str, tuple[str, ...]]] = {}  # at most `max` sizes

    def render(ids: Sequence[Any]) -> tuple[str, Mapping[str, Any]]:
        n = len(ids)
        form = made.get(n)
        if form is None:
            names = [f"_{param}_{i}" for i in range(n)]
            expanded = SQL_STAR.sub("(" + ", ".join(f"%({x})s" for x in names) + ")", text)
            sql, order = translate(expanded)
            form = made[n] = (sql, tuple(order))
        values = {f"_{param}_{i}": v for i, v in enumerate(ids)}
        return form[0], {name: values[name] for name in form[1]}

    return render


def check_sql_batch(cat: Loc, batch: BatchSpec, param: str) -> list[tuple[Loc, str]]:
    """Return the problems of a sql batch: a query that binds `%(id*)s` and nothing else."""
    star = f"%({param}*)s"
    if not isinstance(batch.query, str):
        return [((*cat, "query"), f"a sql batch needs a query string binding {star}")]
    found: list[tuple[Loc, str]] = []
    if batch.path is not None:
        found.append(((*cat, "path"), "a sql batch takes a query, not a path"))
    if star not in batch.query:
        found.append(((*cat, "query"), f"a sql batch must bind its ids: use IN {star}"))
    for name in SQL_STAR.findall(batch.query):
        if name != param:
            found.append(((*cat, "query"), f"%({name}*)s: the item endpoint's id is {param}"))
    for name in templates.sql_param_names(batch.query):
        found.append(((*cat, "query"), f"a sql batch binds only {star}, not %({name})s"))
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
