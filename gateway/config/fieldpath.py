"""Field paths: where in gateway.yaml a value sits, and how a problem prints that place."""

from __future__ import annotations

Loc = tuple[str | int, ...]
"""A value's place in the file: keys and list indexes from the top (`("sources", "x", "dsn")`)."""


def dotted(loc: Loc) -> str:
    """Return `loc` as the one-word path a problem prints (`sources.x.dsn`, `(top)` for none)."""
    return ".".join(part(p) for p in loc) if loc else "(top)"


def part(p: str | int) -> str:
    """Return one key of a path as printed: as is, or quoted and escaped when it is not a word."""
    # A key that is empty or holds spaces, newlines or other unprintables is quoted and escaped,
    # so that a problem stays one line, its path one word, and the key visible.
    text = str(p)
    if text and text.isprintable() and not any(c.isspace() for c in text):
        return text
    return repr(text).replace(" ", "\\x20")
