"""Cache keys: one canonical string per endpoint, config digest and parameter values."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from urllib.parse import quote


def composite_key(
    prefix: str, endpoint: str, digest: str, params: Sequence[tuple[str, object]]
) -> str:
    """Return the cache key of one answer; equal inputs give equal keys, in any parameter order.

    Every part is percent-encoded, so a parameter value can never forge another key's shape
    (`:`, `&`, `=`) nor carry braces, which Redis Cluster would read as a hash tag.
    """
    if len(params) > 1:
        params = sorted(params, key=_name)
    query = "&".join(f"{_name_part(name)}={_value(value)}" for name, value in params)
    return _head(prefix, endpoint, digest) + query


@functools.lru_cache(maxsize=256)
def _head(prefix: str, endpoint: str, digest: str) -> str:
    # The same few endpoints every request: encode their part of the key once.
    return f"{prefix}{quote(endpoint, safe='/')}:{_part(digest)}:"


@functools.lru_cache(maxsize=1024)
def _name_part(name: str) -> str:
    # Parameter names come from the config: the same few, encoded once.
    return _part(name)


def _part(text: str) -> str:
    # Letters and digits are never percent-encoded: the common id is returned as it is.
    if text.isascii() and text.isalnum():
        return text
    return quote(text, safe="")


def _name(param: tuple[str, object]) -> str:
    return param[0]


def _value(value: object) -> str:
    # `!` is always percent-encoded in a quoted string, so these markers cannot be forged by one;
    # bool comes before int so that True and 1 stay apart.
    if value is None or isinstance(value, bool):
        return {None: "!null", True: "!true", False: "!false"}[value]
    if type(value) is int:
        return str(value)  # digits and a minus sign: nothing to encode
    if isinstance(value, float):
        return _part(repr(value))
    return _part(str(value))
