"""Comparing an answer with a case's `expect`: JSON as a subset, and how a difference reads."""

from __future__ import annotations

from typing import Any

import orjson

ABSENT: Any = object()
"""Stands for a key the answer does not have."""


def same_json(expected: Any, got: Any) -> bool:
    """Return whether two JSON scalars (or whole values) are equal; a boolean equals only a
    boolean (in Python `1 == True`)."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, dict) and isinstance(got, dict):
        same = expected.keys() == got.keys()
        return same and all(same_json(v, got[k]) for k, v in expected.items())
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(map(same_json, expected, got))
    return bool(expected == got)


def first_difference(expected: Any, got: Any, path: str = "json") -> tuple[str, Any, Any] | None:
    """Return (path, expected, got) at the first place `got` does not match `expected`, or None.

    An object matches when each key listed in `expected` is there and matches (others are
    ignored); a list when it has as many elements and each matches; anything else when equal.
    """
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return path, expected, got
        for key, value in expected.items():
            where = f"{path}.{key}"
            if key not in got:
                return where, value, ABSENT
            found = first_difference(value, got[key], where)
            if found is not None:
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return path, expected, got
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            found = first_difference(e, g, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if same_json(expected, got) else (path, expected, got)


def show(value: Any, limit: int = 200) -> str:
    """Return a value as one line of JSON (`(absent)` for `ABSENT`), at most `limit` chars."""
    if value is ABSENT:
        return "(absent)"
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."
