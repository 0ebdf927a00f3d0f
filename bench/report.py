"""Results files shared by bench/ and reliability/: newest run first, and which tree it ran."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- newest run below this line -->"


def prepend_run(path: Path, head: str, section: str) -> None:
    """Write `head`, the marker, then `section` above the runs already under the marker."""
    old = path.read_text() if path.exists() else ""
    rest = old.split(MARKER, 1)[1].lstrip("\n") if MARKER in old else ""
    path.write_text(f"{head.rstrip()}\n\n{MARKER}\n\n{section.rstrip()}\n\n{rest}")


def tree_version() -> str:
    """Return `git describe --always --dirty` of the checkout, or 'unknown'."""
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip() or "unknown"
