"""The exception tree: source failures that cost one part of an answer, and config problems."""

from __future__ import annotations

import errno
import re
import socket
import ssl
from dataclasses import dataclass
from typing import ClassVar

from gateway.core.types import Outcome


class SourceError(Exception):
    """A source failed; only its own part of the answer is lost."""

    outcome: ClassVar[Outcome] = "error"


def reason_of(exc: SourceError) -> str:
    """Return why a call failed in a few stable words (`HTTP 503`, `not JSON`, `connect refused`,
    `no such table (MySQL 1146)`), for the access line and `/admin/sources`.

    Made only from the error's type, its HTTP status, the drivers' error codes and class names,
    and the adapters' own fixed phrases; never from text a driver or an upstream wrote, which can
    quote a URL, a header, a SQL parameter or a DSN's user, so none of that is ever copied.
    """
    # The adapters' messages are `source: what happened`; only their own start is matched.
    head, sep, rest = str(exc).partition(": ")
    said = rest if sep and " " not in head else str(exc)
    if isinstance(exc, NotFound):
        if said in ("HTTP 404", "no row"):
            return said
        return "not in the batch answer" if said.startswith("no element with") else "not found"
    if isinstance(exc, CircuitOpen):
        return "circuit open"
    if isinstance(exc, Overloaded):
        return "over max_in_flight"
    if isinstance(exc, Unsendable):
        return "value cannot be sent"
    if isinstance(exc, SourceTimeout):
        return _phrase(said, _TIMEOUT_PHRASES) or _cause_reason(exc) or "timeout"
    if isinstance(exc, BadPayload):
        return _phrase(said, _PAYLOAD_PHRASES) or "bad payload"
    if isinstance(exc, SourceUnavailable):
        if exc.status is not None:
            return f"HTTP {exc.status}"
        found = _cause_reason(exc)
        if found is not None:
            return found
        base = "connect failed" if exc.connect else "unavailable"
        cause = exc.__cause__
        return base if cause is None else f"{base} ({type(cause).__name__})"
    return exc.outcome


_TIMEOUT_PHRASES = (
    (re.compile(r"the database stopped the query"), "statement timeout"),
    (re.compile(r"no time left"), "no time left"),
    (re.compile(r"no answer to ping|no answer to SELECT 1"), "ping timeout"),
)
_PAYLOAD_PHRASES = (
    (re.compile(r"body is not JSON"), "not JSON"),
    (re.compile(r"(compressed )?body (of \d+ bytes )?is over max_bytes"), "over max_bytes"),
    (re.compile(r"compressed body is corrupt"), "corrupt compressed body"),
    (re.compile(r"compressed body ends before"), "compressed body cut short"),
    (re.compile(r"stacked Content-Encoding"), "stacked Content-Encoding"),
    (re.compile(r"Content-Encoding"), "unsupported Content-Encoding"),
    (re.compile(r"over max_rows\b"), "over max_rows"),
    (re.compile(r"column .* is not JSON"), "column not JSON"),
    (re.compile(r"a batch answer must be a JSON array"), "batch answer not a list"),
)


def _phrase(said: str, phrases: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    # `match`: anchored at the start, which the adapter wrote; what follows may be an upstream's.
    return next((reason for pattern, reason in phrases if pattern.match(said)), None)


_MAX_CAUSES = 8


def _cause_reason(exc: BaseException) -> str | None:
    """Return the reason the chain of causes gives: a socket's own (refused, reset, DNS, TLS) wins
    over a driver's error code or class, the closest driver's over farther ones."""
    found = None
    cause: BaseException | None = exc
    for _ in range(_MAX_CAUSES):
        cause = _next_cause(cause) if cause is not None else None
        if cause is None:
            break
        reason = _socket_reason(cause)
        if reason is not None:
            return reason
        if found is None:
            found = _driver_reason(cause)
    return found


def _next_cause(exc: BaseException) -> BaseException | None:
    # A suppressed context counts too: anyio raises BrokenResourceError `from None` over the
    # ConnectionResetError that says what happened.
    return exc.__cause__ or exc.__context__


def _socket_reason(exc: BaseException) -> str | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate rejected"
    if isinstance(exc, ssl.SSLError):
        return "TLS error"
    if isinstance(exc, socket.gaierror):
        return "DNS lookup failed"
    if isinstance(exc, OSError):
        # aiohttp's connector errors are OSErrors with the socket's errno.
        return _ERRNO_REASONS.get(exc.errno or 0)
    return None


_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connect refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed",
    errno.ETIMEDOUT: "network timeout",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "host unreachable",
}


def _driver_reason(exc: BaseException) -> str | None:
    kind = type(exc)
    module, name = kind.__module__, kind.__name__
    if module.startswith("pymysql"):
        code = exc.args[0] if exc.args and type(exc.args[0]) is int else 0
        if code in _MYSQL_CODES:
            return f"{_MYSQL_CODES[code]} (MySQL {code})"
        return f"MySQL error {code}" if code else f"MySQL {name}"
    state = getattr(exc, "sqlstate", None)
    if module.startswith("asyncpg") and isinstance(state, str) and _SQLSTATE.fullmatch(state):
        said = _POSTGRES_STATES.get(state) or _POSTGRES_STATES.get(state[:2])
        return f"{said} (PostgreSQL {state})" if said else f"PostgreSQL error {state}"
    if module == "sqlite3":
        said = _phrase(str(exc), _SQLITE_PHRASES)
        if said is not None:
            return f"{said} (SQLite)"
        errname = str(getattr(exc, "sqlite_errorname", ""))
        return f"SQLite {errname if _SQLITE_CODE.fullmatch(errname) else name}"
    if name == "RemoteProtocolError":  # httpx's: its text is its own, not the upstream's
        return _phrase(str(exc), _PROTOCOL_PHRASES) or "protocol error"
    if name in _CLASS_REASONS:
        return _CLASS_REASONS[name]
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return f"network error ({errno.errorcode[exc.errno]})"
    return None


_MYSQL_CODES = {
    1040: "too many connections",
    1044: "access denied",
    1045: "access denied",
    1049: "unknown database",
    1054: "unknown column",
    1064: "SQL syntax error",
    1129: "host blocked",
    1130: "host not allowed",
    1142: "permission denied",
    1146: "no such table",
    1205: "lock wait timeout",
    1213: "deadlock",
    1305: "unknown function",
    2002: "connect failed",
    2003: "connect failed",
    2005: "unknown host",
    2006: "server has gone away",
    2013: "connection lost",
}
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_POSTGRES_STATES = {
    "42P01": "no such table",
    "42703": "unknown column",
    "42601": "SQL syntax error",
    "42883": "unknown function",
    "42501": "permission denied",
    "28P01": "access denied",
    "28000": "access denied",
    "3D000": "unknown database",
    "53300": "too many connections",
    "57P01": "server shutting down",
    "57P03": "server not accepting connections",
    "40P01": "deadlock",
    "40001": "serialization failure",
    "55P03": "lock not available",
    # By class, when the state itself is not listed.
    "08": "connection failed",
    "22": "bad value",
    "23": "constraint violated",
    "53": "server out of resources",
}
_SQLITE_CODE = re.compile(r"SQLITE_[A-Z_]{1,40}")
_SQLITE_PHRASES = (
    (re.compile(r"no such table"), "no such table"),
    (re.compile(r"no such column"), "unknown column"),
    (re.compile(r"no such function"), "unknown function"),
    (re.compile(r".*syntax error$"), "SQL syntax error"),
    (re.compile(r"database is locked"), "database locked"),
    (re.compile(r"unable to open database"), "cannot open database"),
    (re.compile(r"attempt to write a readonly database"), "read-only database"),
    (re.compile(r"file is not a database"), "not a database"),
)
_PROTOCOL_PHRASES = (
    (re.compile(r"peer closed connection without sending complete"), "incomplete body"),
    (re.compile(r"Server disconnected without sending a response"), "connection closed"),
)
_CLASS_REASONS = {
    "ClientPayloadError": "incomplete body",
    "ServerDisconnectedError": "connection closed",
    "ClientConnectorDNSError": "DNS lookup failed",
    "ClientConnectorCertificateError": "TLS certificate rejected",
    "ClientConnectorSSLError": "TLS error",
    "ClientResponseError": "invalid HTTP response",
    "ClientConnectorError": "connect failed",
    "ConnectError": "connect failed",
    "ReadError": "read error",
    "WriteError": "write error",
    "LocalProtocolError": "protocol error",
    "InvalidURL": "invalid URL",
    "UnsupportedProtocol": "invalid URL",
    "ConnectionDoesNotExistError": "connection lost",
    "ConnectTimeout": "connect timeout",
    "ReadTimeout": "read timeout",
    "WriteTimeout": "write timeout",
    "PoolTimeout": "pool timeout",
}
"""aiohttp's, httpx's and asyncpg's errors by class name: this module imports no driver."""


class SourceTimeout(SourceError):
    """The call did not finish within its timeout or the endpoint deadline."""

    outcome = "timeout"


class SourceUnavailable(SourceError):
    """The source could not be reached or answered with a failure status."""

    def __init__(self, message: str, *, status: int | None = None, connect: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.connect = connect

    @property
    def refused(self) -> bool:
        """True when the source answered and refused only this call (3xx, 4xx but 408 and 429).

        Such an answer says the call was wrong, not that the source is sick: it is never retried
        and never counts against the breaker, or any client could open it for everyone.
        """
        return self.status is not None and self.status < 500 and self.status not in (408, 429)


class BadPayload(SourceError):
    """The source answered, but with a body that cannot be used (bad JSON, too large)."""


class Unsendable(SourceError):
    """The call could not be put to its source: the driver refused one of its values (an integer
    beyond the database's range, text that a header or a query cannot carry)."""


class NotFound(SourceError):
    """The source has no such thing (HTTP 404, no row for a `one: true` query)."""

    outcome = "not_found"


class CircuitOpen(SourceError):
    """The source's breaker is open; the call failed without being tried."""

    outcome = "circuit_open"


class Overloaded(SourceError):
    """The source already has `max_in_flight` calls running; this one failed fast."""

    outcome = "overloaded"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file, located by line and field path."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(Exception):
    """A config file is invalid; carries every problem found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.path))
        super().__init__("\n".join(str(p) for p in self.problems))
