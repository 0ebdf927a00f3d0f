"""The shaping benchmark starts, measures both endpoints and writes its table (its figures are
reported, not judged here; its own verdict, with a margin of about 30x, is its exit status)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_quick_shape_bench_measures_both_endpoints(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS-shape.md"
    argv = [sys.executable, "bench/shape.py", "--quick", "--results", str(results)]
    run = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env=os.environ | {"BENCH_LOG_DIR": str(tmp_path)},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    text = results.read_text()
    assert "| answer() in process, µs |" in text and "| gateway CPU per miss, µs |" in text
    assert "shaping <= 5% of a miss's CPU: PASS" in text
