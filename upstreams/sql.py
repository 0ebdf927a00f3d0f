"""What every SQL source shares, whatever its database: its settings, and rows made JSON.

Each database is its own module with a `*_source(name, SqlSettings)` factory and its `map_errors`
(`upstreams.mysql`, `upstreams.sqlite`, `upstreams.postgresql`), one row each in the kind table.
A call runs `Call.target` with `Call.params` bound by the driver and returns the first row as a
dict (`one`) or a list of row dicts. A result of more than `Call.max_rows` rows is `BadPayload`
(`over max_rows N`), found by reading at most `max_rows + 1` rows, never the whole result.

Values come out JSON-ready: DECIMAL as float (precision beyond a double is lost), DATETIME/DATE/
TIME as ISO 8601 text, MySQL TIME (a duration) as `[-]HH:MM:SS[.ffffff]`, binary values (BINARY,
VARBINARY, BLOB, BIT, bytea, SQLite blobs) as base64 text always, text as text whatever its
collation, and JSON columns as JSON values where the driver can tell them (MySQL JSON, MariaDB
table columns with a `json_valid` CHECK, PostgreSQL json/jsonb; SQLite has no JSON type: there
JSON is text). Each adapter's docstring says what its driver decides.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from gateway.core.errors import BadPayload, NotFound
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


def too_many(name: str, max_rows: int) -> BadPayload:
    """Return the error of a result with more than `max_rows` rows."""
    return BadPayload(f"{name}: over max_rows {max_rows}")


def json_result(name: str, rows: list[dict[str, Any]], one: bool, max_rows: int) -> JSON:
    """Return the rows as JSON: the first row (`one`, `NotFound` without one) or all of them;
    more than `max_rows` rows is `BadPayload`."""
    if len(rows) > max_rows:
        raise too_many(name, max_rows)
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
    as base64 text, sets sorted; anything else as it is."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return _duration(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


def json_text(name: str, column: str, text: str | bytes) -> JSON:
    """Return the JSON value a JSON column's text holds (`BadPayload` when it holds none, or a
    number beyond a double); `column` names it in the error."""
    try:
        value: JSON = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadPayload(f"{name}: column {column} is not JSON: {exc}") from exc
    return value


def _duration(value: datetime.timedelta) -> str:
    micros = abs(value) // datetime.timedelta(microseconds=1)
    seconds, micros = divmod(micros, 1_000_000)
    text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if micros:
        text += f".{micros:06d}"
    return "-" + text if value < datetime.timedelta(0) else text
