"""The exception tree: source failures that cost one part of an answer, and config problems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.core.types import Outcome


class SourceError(Exception):
    """A source failed; only its own part of the answer is lost."""

    outcome: ClassVar[Outcome] = "error"


def reason_of(exc: SourceError) -> str:
    """Return why a call failed, short, for the access line and `/admin/sources`: the error's
    message without the `source: ` prefix the adapters give it."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    reason = rest if sep and " " not in head else text
    return reason[:200] or exc.outcome


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
