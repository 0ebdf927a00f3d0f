"""The reliability runs in their CI form: chaos for 12 s at 100 requests a second, chaos with
hostile upstreams for 5 s, and a soak of 5,000 requests, each as the subprocess a person would run
(reliability/README.md). Each starts its own servers and `gateway serve`; together they take
about a minute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, results: Path, *args: str, timeout_s: float) -> dict[str, Any]:
    """Run a reliability script; return its SUMMARY, failing with its output if it failed."""
    run = subprocess.run(
        [sys.executable, f"reliability/{script}", *args, "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, output
    lines = [line for line in run.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, output
    summary: dict[str, Any] = json.loads(lines[0].removeprefix("SUMMARY "))
    assert summary["passed"] and summary["failures"] == []
    assert "<!-- newest run below this line -->" in results.read_text()
    return summary


@pytest.mark.timeout(100)
def test_chaos_short_form_keeps_deadline_contract_and_resources(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    s = run_script("chaos.py", results, "--seconds", "12", "--rate", "100", timeout_s=90)
    assert s["requests"] == 1200 and s["shed"] == 0 and s["no_answer"] == 0
    assert set(s["statuses"]) <= {"200", "404", "502", "503", "504"}
    assert all(k.endswith(" product") for k in s["five_xx_calls"])
    assert s["latency_ms"]["max"] <= 350 and s["over_limit"] == 0
    for kind in ("mariadb_restart", "redis_restart", "upstream_crash"):
        assert s["faults"][kind] == 1
    assert s["faults_injected"] >= 4
    assert s["tasks"]["after"] <= s["tasks"]["before"]
    assert all(v == 0 for v in s["pools"]["after"].values())
    assert s["rss_kb"]["growth_pct"] < 10
    text = results.read_text()
    assert "## chaos" in text and "| faults injected |" in text and "| result | PASS |" in text


@pytest.mark.timeout(100)
def test_chaos_hostile_upstreams_short_form_leaks_nothing(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    args = ("--hostile", "--seconds", "5", "--rate", "100", "--bomb-mb", "200", "--seed", "7")
    s = run_script("chaos.py", results, *args, timeout_s=90)
    assert s["requests"] == 500
    assert set(s["statuses"]) <= {"200", "404", "502", "503", "504"}
    assert all(k.endswith(" product") for k in s["five_xx_calls"])
    for answers in s["upstream_answers"].values():
        assert set(answers) == {"ok", "cookie", "deep", "bomb", "refuse"}
    assert s["upstream_answers"]["pricing"]["refuse"] >= 100  # the 400 storm
    assert all(n == 0 for n in s["cookies_sent_upstream"].values())
    assert s["breaker_opens"] == {} and s["breakers_after"] == {"pricing": "closed"}
    assert s["rss_kb"]["peak_growth"] < 64 * 1024
    text = results.read_text()
    assert "## chaos, hostile upstreams" in text and "| result | PASS |" in text


@pytest.mark.timeout(100)
def test_soak_short_form_keeps_memory_flat_and_reports_top_sites(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    s = run_script("soak.py", results, "--requests", "5000", timeout_s=90)
    assert s["requests"] == 5000
    assert {"HIT", "MISS"} <= set(s["x_cache"])
    assert s["rss_kb"]["growth_pct"] < 10
    assert 1 <= len(s["top_sites"]) <= 10
    assert all({"site", "bytes", "count"} <= set(t) for t in s["top_sites"])
    text = results.read_text()
    assert "## soak" in text and "Top 10 allocation sites" in text
