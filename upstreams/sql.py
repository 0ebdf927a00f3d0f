"""What every SQL source shares, whatever its database: its settings, and rows made JSON.

Each database is its own module with a `*_source(name, SqlSettings)` factory and its `map_errors`
(`upstreams.mysql`, `upstreams.sqlite`, `upstreams.postgresql`), one row each in the kind table.
A call runs `Call.target` with `Call.params` bound by the driver and returns the first row as a
dict (`one`) or a list of row dicts. Values come out JSON-ready: DECIMAL as float (precision
beyond a double is lost), DATETIME/DATE/TIME as ISO 8601 text, MySQL TIME (a duration) as
`[-]HH:MM:SS[.ffffff]`, bytes as UTF-8 text or, when they are not UTF-8, as base64 text.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.core.errors import NotFound
from gateway.core.types import JSON

_PLAIN = (int, str, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class SqlPoolSettings:
    """Connection pool limits of a SQL source."""

    min: int = 1
    max: int = 10
    recycle_s: int = 3600


@dataclass(frozen=True, slots=True)
class SqlSettings:
    """What a SQL source's adapter needs: its DSN and its pool limits."""

    dsn: str
    pool: SqlPoolSettings = SqlPoolSettings()


def json_result(name: str, rows: list[dict[str, Any]], one: bool) -> JSON:
    """Return the rows as JSON: the first row (`one`, `NotFound` without one) or all of them."""
    if one:
        if not rows:
            raise NotFound(f"{name}: no row")
        return _json_row(rows[0])
    return [_json_row(row) for row in rows]


def _json_row(row: dict[str, Any]) -> dict[str, JSON]:
    return {
        key: value if type(value) in _PLAIN else json_value(value) for key, value in row.items()
    }


def json_value(value: Any) -> JSON:
    """Return a driver's value as JSON: DECIMAL as float, temporal values as ISO 8601 text, bytes
    as UTF-8 (or base64) text, sets sorted; anything else as it is."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return _duration(value)
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


def _duration(value: datetime.timedelta) -> str:
    micros = abs(value) // datetime.timedelta(microseconds=1)
    seconds, micros = divmod(micros, 1_000_000)
    text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if micros:
        text += f".{micros:06d}"
    return "-" + text if value < datetime.timedelta(0) else text
