"""Secrets of a config file: what in it is secret, and the same text or data with them replaced.

A secret is whatever came from an environment variable named like one (`*TOKEN*`, `*SECRET*`...) or
filled a secret-looking field, every source header value, every literal of a call's query, and
every URL or DSN password. They never appear in problems, logs or `/admin/config`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.config.calls import STAR
from gateway.config.fieldpath import Loc
from gateway.core import templates
from gateway.core.errors import Problem

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.I)
"""Environment variable names and field names whose values are secrets."""

_AUTH_SCHEMES = frozenset({"basic", "bearer", "digest", "token", "apikey"})


def literal_secrets(value: str, loc: Loc) -> set[str]:
    """Return what in a config value is secret whatever its origin (`${VAR}` or written as is):
    a source header's value (and its credential after `Bearer `), an http call query value's
    literal text, and a URL's or DSN's password."""
    found: set[str] = set()
    if len(loc) == 4 and loc[0] == "sources" and loc[2] == "headers":
        found.update((value, value.partition(" ")[2].strip()))
    if _is_call_query(loc):
        # `{id*}` (a batch's ids) names values too: it is no literal.
        literal = STAR.sub("", value)
        found.update(p.strip() for p in templates.parse(literal).parts if isinstance(p, str))
    try:
        password = urlsplit(value).password
    except ValueError:  # not a URL at all ("http://[::1")
        password = None
    if password:
        found.update((password, unquote(password)))
    return {s for s in found if s}


def _is_call_query(loc: Loc) -> bool:
    """Whether `loc` is a value of an http call's query, or of its batch's."""
    if not (loc[:1] == ("endpoints",) and len(loc) > 4 and loc[2] == "calls"):
        return False
    return (len(loc) == 6 and loc[4] == "query") or (
        len(loc) == 7 and loc[4] == "batch" and loc[5] == "query"
    )


def redacted(data: dict[str, Any], secrets: frozenset[str]) -> dict[str, Any]:
    """Return a config dumped as plain data with every secret value replaced: every source header
    value and every call query value but a pure template, wholly; URL and DSN passwords and every
    other secret wherever they appear."""
    for source in data.get("sources", {}).values():
        if isinstance(source.get("headers"), dict):
            source["headers"] = {k: _masked(v) for k, v in source["headers"].items()}
    for endpoint in data.get("endpoints", []):
        for call in endpoint.get("calls", {}).values():
            for block in (call, call.get("batch") or {}):
                if isinstance(block.get("query"), dict):
                    block["query"] = {
                        k: v if _pure_template(v) else "***" for k, v in block["query"].items()
                    }
    redacted_data: dict[str, Any] = _redact(data, secrets)
    return redacted_data


def _masked(value: Any) -> str:
    """Return `***` for a header value, keeping a known auth scheme (`Bearer ***`) in sight."""
    scheme, _, credential = str(value).partition(" ")
    return f"{scheme} ***" if scheme.lower() in _AUTH_SCHEMES and credential else "***"


def _pure_template(value: Any) -> bool:
    """Whether a query value is references only (`{product.category}`): nothing of it is secret."""
    if not isinstance(value, str) or not value:
        return False
    value = STAR.sub("{ids}", value)
    return all(isinstance(p, templates.Ref) for p in templates.parse(value).parts)


def redact_problems(problems: list[Problem], secrets: set[str]) -> list[Problem]:
    """Return `problems` with every secret of the file out of their messages: `gateway check`
    and a refused reload print them."""
    frozen = frozenset(secrets)
    return [
        Problem(p.file, p.line, redact_text(p.path, frozen), redact_text(p.message, frozen))
        for p in problems
    ]


def _redact(data: Any, secrets: frozenset[str]) -> Any:
    if isinstance(data, dict):
        return {k: _redact(v, secrets) for k, v in data.items()}
    if isinstance(data, list):
        return [_redact(v, secrets) for v in data]
    if isinstance(data, str):
        return redact_text(data, secrets)
    return data


def redact_text(text: str, secrets: frozenset[str]) -> str:
    """Return `text` with every secret value (and any URL password) replaced by `***`."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]+@", r"\1***@", text)
