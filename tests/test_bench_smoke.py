"""The benchmark starts, measures every scenario and writes a result (speed is not judged here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "miss": ("baseline", "gateway"),
    "latency-8": ("baseline", "gateway"),
    "latency-64": ("baseline", "gateway"),
    "hit": ("gateway",),
    "faults": ("baseline", "gateway"),
    "stampede": ("baseline", "gateway"),
}


def _gateway_serve_exists() -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    return probe.returncode == 0


@pytest.mark.timeout(300)
def test_quick_bench_writes_a_row_per_scenario_and_target(tmp_path: Path):
    targets = ("baseline", "gateway") if _gateway_serve_exists() else ("baseline",)
    results = tmp_path / "RESULTS.md"
    argv = [sys.executable, "bench/run.py", "--quick", "--results", str(results)]
    if targets == ("baseline",):
        argv += ["--only", "baseline"]
    run = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"BENCH_LOG_DIR": str(tmp_path)},
    )
    # run.py installs wrk itself (bench/install_wrk.sh) when it is missing.
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    text = results.read_text()
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3])
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| scenario")
    }
    for scenario, who in SCENARIOS.items():
        for target in who:
            if target in targets:
                assert (scenario, target) in rows, f"no row for {scenario}/{target}:\n{text}"
    assert "- machine: " in text and "Targets" in text
    if "gateway" in targets:
        assert "stampede: 1 call per upstream" in text
