"""The listing benchmark runs, writes a row per setting and case, and its cold listing asks each
source once per chunk (a count; its CPU and latency figures are reported, not judged here)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("0 ms", "same latencies")
CASES = ("cold listing", "24 singles", "half-cached listing", "one miss")
SOURCES = ("catalog", "pricing", "inventory", "reviews", "recs")
SIZE = 24
DEFAULT_BATCH_MAX = 100  # gateway.config.schema.BatchConfig.max


def _chunks() -> dict[str, int]:
    """Batch requests per source for 24 cold ids, from the bench's config."""
    doc = yaml.safe_load((ROOT / "bench" / "gateway.listing.yaml").read_text())
    item = next(e for e in doc["endpoints"] if "calls" in e)
    return {
        call["source"]: math.ceil(SIZE / call["batch"].get("max", DEFAULT_BATCH_MAX))
        for call in item["calls"].values()
    }


@pytest.mark.timeout(300)
def test_quick_listing_bench_writes_every_row_and_batches_each_source_once_per_chunk(
    tmp_path: Path,
):
    results = tmp_path / "RESULTS-listing.md"
    run = subprocess.run(
        [sys.executable, "bench/listing.py", "--quick", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env=os.environ | {"BENCH_LOG_DIR": str(tmp_path)},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    text = results.read_text()
    header = "| upstreams | case | rounds | " + " | ".join(SOURCES) + " |"
    assert header in text, text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) > 3 and (cells[0], cells[1]) in {(s, c) for s in SETTINGS for c in CASES}:
            rows[cells[0], cells[1]] = dict(zip(SOURCES, map(float, cells[3:8]), strict=True))
    assert set(rows) == {(s, c) for s in SETTINGS for c in CASES}, text
    chunks = _chunks()
    assert set(chunks) == set(SOURCES)
    for setting in SETTINGS:
        cold = rows[setting, "cold listing"]
        per_chunk = {s: cold[s] / chunks[s] for s in SOURCES}
        assert all(v <= 1 for v in per_chunk.values()), (setting, per_chunk)
        # The counters do count: the listing asked every source, each single asked each one.
        assert all(cold[s] >= 1 for s in SOURCES), (setting, cold)
        singles = rows[setting, "24 singles"]
        assert all(singles[s] >= SIZE for s in SOURCES), (setting, singles)
    assert "upstream request per source per chunk: PASS" in text, text
