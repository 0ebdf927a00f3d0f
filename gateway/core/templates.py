"""Templates in calls (`/prices/{id}`, `{product.category}`): parsed once, rendered safely."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\}")
_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z]+))?\}")
_SQL_PARAM = re.compile(r"%\(([A-Za-z_][A-Za-z0-9_]*)\)s")


class Unrenderable(Exception):
    """A template names a value that is missing or not a scalar."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to a path parameter (`id`) or a field of a call's result (`product.category`)."""

    root: str
    attrs: tuple[str, ...]

    def resolve(self, scope: Mapping[str, Any]) -> Any:
        """Return the referenced value from `scope` (parameters and call results by name)."""
        value = scope.get(self.root)
        for attr in self.attrs:
            if isinstance(value, Mapping):
                value = value.get(attr)
            elif isinstance(value, list) and attr.isdigit() and int(attr) < len(value):
                value = value[int(attr)]
            else:
                value = None
            if value is None:
                break
        if value is None or isinstance(value, dict | list):
            raise Unrenderable(f"{{{self.text}}} has no scalar value")
        return value

    @property
    def text(self) -> str:
        return ".".join((self.root, *self.attrs))


@dataclass(frozen=True, slots=True)
class Template:
    """A string split into literal text and references, with a renderer for each use."""

    parts: tuple[str | Ref, ...]

    @property
    def refs(self) -> tuple[Ref, ...]:
        return tuple(p for p in self.parts if isinstance(p, Ref))

    def is_single_ref(self) -> bool:
        return len(self.parts) == 1 and isinstance(self.parts[0], Ref)

    def render_path(self, scope: Mapping[str, Any]) -> str:
        """Render as a URL path: each value becomes exactly one percent-encoded segment part."""
        out = [p if isinstance(p, str) else path_segment(p.resolve(scope)) for p in self.parts]
        return "".join(out)

    def render_value(self, scope: Mapping[str, Any]) -> Any:
        """Render as a query or SQL value: a lone reference keeps its type, otherwise a string."""
        if self.is_single_ref():
            ref = self.parts[0]
            assert isinstance(ref, Ref)
            return ref.resolve(scope)
        return "".join(
            p if isinstance(p, str) else scalar_text(p.resolve(scope)) for p in self.parts
        )


def parse(text: str) -> Template:
    """Split `text` into literals and `{name.attr}` references."""
    parts: list[str | Ref] = []
    pos = 0
    for m in _REF.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        attrs = tuple(a for a in m.group(2).split(".") if a)
        parts.append(Ref(m.group(1), attrs))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return Template(tuple(parts))


def path_params(path: str) -> list[tuple[str, str]]:
    """Return `(name, type)` for each `{name:type}` in an endpoint path (type defaults to str)."""
    return [(m.group(1), m.group(2) or "str") for m in _PATH_PARAM.finditer(path)]


def starlette_path(path: str) -> str:
    """Return the endpoint path with types stripped (`/products/{id}`); we validate types."""
    return _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", path)


def sql_param_names(query: str) -> list[str]:
    """Return the `%(name)s` placeholders of a SQL query, in order of first use."""
    return list(dict.fromkeys(_SQL_PARAM.findall(query)))


def sqlite_placeholders(query: str) -> str:
    """Rewrite `%(name)s` placeholders to SQLite's `:name` (placeholder syntax only, no values)."""
    return _SQL_PARAM.sub(lambda m: ":" + m.group(1), query)


def scalar_text(value: Any) -> str:
    """Return the text of a scalar as it appears in a URL or SQL string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def path_segment(value: Any) -> str:
    """Percent-encode a value so it stays one path segment: `/`, `?`, `#`, `%`, `..` included."""
    if type(value) is int:
        return str(value)  # digits and a sign: nothing to encode (and ids are mostly ints)
    text = quote(scalar_text(value), safe="")
    if text in (".", ".."):
        return text.replace(".", "%2E")
    return text
