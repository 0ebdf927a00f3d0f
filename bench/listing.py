"""Benchmark listings: one `GET /products?ids=` of 24 ids against 24 single item requests.

`python bench/listing.py [--rounds N] [--quick] [--results PATH]`, from the repository root.
It seeds MariaDB (`gwbench`), starts the simulated upstreams and the gateway (one worker,
bench/gateway.listing.yaml) as separate processes, and per round measures, on ids no request
asked for before: a cold listing of 24, 24 single item misses sent concurrently, a listing of
24 of which 12 were just fetched singly, and one single miss. Each at upstreams of 0 ms and at
the latency scenario's 20/30/50/40 ms. Writes a markdown table to stdout and to --results
(newest run first). See bench/README.md, section "Listings".
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import aiomysql
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.report import prepend_run, tree_version  # noqa: E402
from bench.run import (  # noqa: E402
    JITTER_MS,
    LATENCY,
    cpu_ns,
    machine,
    process,
    simulated,
    wait_ready,
)
from gateway.config.schema import BatchConfig  # noqa: E402
from gateway.demo.catalog import seed_mysql  # noqa: E402
from gateway.demo.simulator import SERVICES  # noqa: E402
from tests.support import free_port  # noqa: E402

CONFIG = BENCH / "gateway.listing.yaml"
CATALOG_IDS = 10_000
SIZE = 24
"""Ids per listing, and single requests per set."""
WARM = 12
"""Items of the half-cached listing fetched singly first."""
WARMUP_ROUNDS = 2
"""Unmeasured rounds per setting: connection pools, caches of the interpreter."""
SOURCES = ("catalog", *SERVICES)
SETTINGS: dict[str, Mapping[str, float]] = {
    "0 ms": dict.fromkeys(SERVICES, 0),
    "same latencies": LATENCY,
}
"""Upstream latency settings: none, and bench/README's latency scenario (+-JITTER_MS)."""
LATENCY_SETTING = "same latencies"
CASES = ("cold listing", "24 singles", "half-cached listing", "one miss")
IDS_PER_ROUND = 3 * SIZE + 1
MAX_ROUNDS = CATALOG_IDS // (len(SETTINGS) * IDS_PER_ROUND) - WARMUP_ROUNDS
"""Every measured id is fresh: the catalog's 10,000 ids bound the rounds."""
TIMEOUT = aiohttp.ClientTimeout(total=10)
CPU_TARGET = 0.35
P50_TARGET = 1.5


@dataclass
class Case:
    """What one case did over the rounds of one latency setting."""

    walls_s: list[float] = field(default_factory=list)
    cpu_ns: int = 0
    upstream: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SOURCES})
    answers: int = 0
    not_ok: int = 0

    def median(self, source: str) -> float:
        """Return the median over rounds of one source's requests in a round."""
        return statistics.median(self.upstream[source])

    def cpu_ms(self) -> float:
        """Return the gateway's CPU ms per round (one listing, one set of singles, one miss)."""
        return self.cpu_ns / 1e6 / max(1, len(self.walls_s))


def percentile(values: Sequence[float], p: float) -> float:
    """Return the nearest-rank `p` percentile (0 < p <= 100) of non-empty `values`."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def chunks_per_source(config: Path, size: int) -> dict[str, int]:
    """Return the batch requests per source a listing of `size` cold items needs by config."""
    doc = yaml.safe_load(config.read_text())
    item = next(e for e in doc["endpoints"] if "calls" in e)
    default = BatchConfig.model_fields["max"].default
    out: dict[str, int] = {}
    for call in item["calls"].values():
        batch = call.get("batch")
        if batch is None:
            raise SystemExit(f"{config}: every call must be batchable, {call} is not")
        out[call["source"]] = out.get(call["source"], 0) + math.ceil(
            size / batch.get("max", default)
        )
    return out


class Bench:
    """The client side: one aiohttp session, one MariaDB connection for Com_select, the
    gateway's pid for its CPU, and the simulator's counters."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        sql: aiomysql.Connection,
        gateway: str,
        pid: int,
        sim_urls: Mapping[str, str],
    ) -> None:
        self.session = session
        self.sql = sql
        self.gateway = gateway
        self.pid = pid
        self.sim_urls = sim_urls

    async def counters(self) -> dict[str, int]:
        """Return the request counters of the four services and MariaDB's global Com_select."""

        async def one(url: str) -> int:
            async with self.session.get(f"{url}/_stats", timeout=TIMEOUT) as resp:
                return int((await resp.json())["requests"])

        counts = await asyncio.gather(*(one(u) for u in self.sim_urls.values()))
        async with self.sql.cursor() as cur:
            await cur.execute("SHOW GLOBAL STATUS LIKE 'Com_select'")
            row = await cur.fetchone()
        return {"catalog": int(row[1]), **dict(zip(self.sim_urls, counts, strict=True))}

    async def behave(self, delays: Mapping[str, float]) -> None:
        """Set each simulated service's latency (with jitter when it is not zero)."""
        for name, url in self.sim_urls.items():
            delay = delays[name]
            body = {"delay_ms": delay, "jitter_ms": JITTER_MS if delay else 0}
            body |= {"error_rate": 0, "hang_rate": 0}
            async with self.session.post(f"{url}/_control", json=body, timeout=TIMEOUT) as resp:
                resp.raise_for_status()

    async def listing(self, ids: Sequence[int], misses: int) -> int:
        """GET the listing of `ids`; return 1 unless it is a complete 200 with `misses` misses."""
        url = f"{self.gateway}/products?ids={','.join(map(str, ids))}"
        async with self.session.get(url, timeout=TIMEOUT) as resp:
            body = await resp.json() if resp.status == 200 else None
            timing = resp.headers.get("Server-Timing", "")
        complete = isinstance(body, dict) and body["_meta"]["complete"] is True
        misses_seen = f"MISS {misses}" in timing if misses else "MISS" not in timing
        return 0 if complete and misses_seen else 1

    async def single(self, i: int) -> int:
        """GET one item; return 1 unless it is a complete 200 that missed the cache."""
        async with self.session.get(f"{self.gateway}/products/{i}", timeout=TIMEOUT) as resp:
            await resp.read()
            good = (
                resp.status == 200
                and resp.headers.get("X-Cache") == "MISS"
                and resp.headers.get("X-Gateway-Complete") == "true"
            )
        return 0 if good else 1

    async def singles(self, ids: Sequence[int]) -> int:
        """GET `ids` singly, all at once; return how many answers were not as expected."""
        return sum(await asyncio.gather(*(self.single(i) for i in ids)))

    async def measure(self, case: Case, answers: int, work: Coroutine[Any, Any, int]) -> None:
        """Await `work` (its not-OK count); add its wall time, the gateway's CPU and the
        upstream requests it caused to `case`."""
        before = await self.counters()
        cpu = cpu_ns(self.pid)
        started = time.perf_counter()
        not_ok = await work
        case.walls_s.append(time.perf_counter() - started)
        # Read after the counters, so that work the gateway does after answering is counted.
        after = await self.counters()
        case.cpu_ns += cpu_ns(self.pid) - cpu
        for source in SOURCES:
            case.upstream[source].append(after[source] - before[source])
        case.answers += answers
        case.not_ok += not_ok

    async def setting(self, ids: Iterator[int], rounds: int) -> dict[str, Case]:
        """Measure every case for `rounds` rounds (after the warm-up ones) on fresh ids."""
        cases = {name: Case() for name in CASES}
        for n in range(WARMUP_ROUNDS + rounds):
            got = cases if n >= WARMUP_ROUNDS else {name: Case() for name in CASES}
            cold = [next(ids) for _ in range(SIZE)]
            await self.measure(got["cold listing"], 1, self.listing(cold, SIZE))
            singles = [next(ids) for _ in range(SIZE)]
            await self.measure(got["24 singles"], SIZE, self.singles(singles))
            half = [next(ids) for _ in range(SIZE)]
            await self.singles(half[:WARM])
            await self.measure(got["half-cached listing"], 1, self.listing(half, SIZE - WARM))
            await self.measure(got["one miss"], 1, self.single(next(ids)))
        return cases


# --- report ----------------------------------------------------------------------------------


def table(results: Mapping[str, Mapping[str, Case]]) -> list[str]:
    """Return the markdown table: per setting and case, upstream requests, CPU and latency."""
    rows = [
        "| upstreams | case | rounds | " + " | ".join(SOURCES) + " | CPU ms | p50 ms | p99 ms "
        "| not OK |",
        "|---|---|---:|" + "---:|" * len(SOURCES) + "---:|---:|---:|---:|",
    ]
    for setting, cases in results.items():
        for name, c in cases.items():
            counts = " | ".join(f"{c.median(s):g}" for s in SOURCES)
            p50, p99 = (percentile(c.walls_s, p) * 1000 for p in (50, 99))
            rows.append(
                f"| {setting} | {name} | {len(c.walls_s)} | {counts} | {c.cpu_ms():.2f} "
                f"| {p50:.1f} | {p99:.1f} | {c.not_ok}/{c.answers} |"
            )
    return rows


def targets(results: Mapping[str, Mapping[str, Case]], chunks: Mapping[str, int]) -> list[str]:
    """Return the three targets per setting as ratios measured in this run, PASS or FAIL."""

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines = []
    for setting, cases in results.items():
        cold, singles, one = cases["cold listing"], cases["24 singles"], cases["one miss"]
        per_chunk = {s: cold.median(s) / chunks[s] for s in SOURCES}
        worst_http = {s: max(cold.upstream[s]) / chunks[s] for s in SERVICES}
        ok = all(v <= 1 for v in per_chunk.values()) and all(v <= 1 for v in worst_http.values())
        shown = ", ".join(f"{s} {v:g}" for s in SOURCES for v in [per_chunk[s]])
        worst = ", ".join(f"{s} {v:g}" for s, v in worst_http.items())
        lines.append(
            f"- {setting}: cold listing <= 1 upstream request per source per chunk: {mark(ok)} "
            f"(median per chunk: {shown}; http worst round: {worst})"
        )
        cpu = cold.cpu_ms() / singles.cpu_ms() if singles.cpu_ms() else math.inf
        lines.append(
            f"- {setting}: CPU per cold listing <= {CPU_TARGET}x of 24 single misses: "
            f"{mark(cpu <= CPU_TARGET)} ({cpu:.2f}x: {cold.cpu_ms():.2f} / "
            f"{singles.cpu_ms():.2f} ms)"
        )
        p50 = percentile(cold.walls_s, 50) / percentile(one.walls_s, 50)
        verdict = mark(p50 <= P50_TARGET) if setting == LATENCY_SETTING else "info only"
        lines.append(
            f"- {setting}: p50 of a cold listing <= {P50_TARGET}x p50 of one item miss: "
            f"{verdict} ({p50:.2f}x)"
        )
    return lines


def section(
    command: str,
    results: Mapping[str, Mapping[str, Case]],
    chunks: Mapping[str, int],
    notes: Sequence[str],
) -> str:
    """Return this run's markdown section: machine, command, notes, table and targets."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"## {stamp}",
            "",
            f"- machine: {machine()}",
            f"- command: `{command}`",
            *notes,
            "",
            *table(results),
            "",
            f"Targets (batch requests per source by config for {SIZE} cold ids: "
            + ", ".join(f"{s} {n}" for s, n in chunks.items())
            + "):",
            "",
            *targets(results, chunks),
            "",
        ]
    )


# --- main ------------------------------------------------------------------------------------


async def run(
    gateway: str, pid: int, sim_urls: Mapping[str, str], dsn: str, rounds: int
) -> dict[str, dict[str, Case]]:
    """Measure every setting in turn, each on its own fresh ids."""
    ids = list(range(1, CATALOG_IDS + 1))
    random.Random(0).shuffle(ids)
    fresh = iter(ids)
    parts = urlsplit(dsn)
    sql = await aiomysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
    )
    results: dict[str, dict[str, Case]] = {}
    try:
        connector = aiohttp.TCPConnector(limit=4 * SIZE)
        async with aiohttp.ClientSession(connector=connector) as session:
            bench = Bench(session, sql, gateway, pid, sim_urls)
            for setting, delays in SETTINGS.items():
                await bench.behave(delays)
                started = time.monotonic()
                results[setting] = await bench.setting(fresh, rounds)
                print(f"{setting}: {time.monotonic() - started:.1f} s", flush=True)
            await bench.behave(SETTINGS["0 ms"])
    finally:
        sql.close()
    return results


def main() -> None:
    """Parse the command line, start the processes, measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rounds", type=int, help=f"rounds per case (default 60, at most {MAX_ROUNDS})"
    )
    parser.add_argument("--quick", action="store_true", help="5 rounds per case: a smoke run")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS-listing.md")
    parser.add_argument("--mysql", default="mysql://root@127.0.0.1:3306/gwbench")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 60)
    if not 1 <= rounds <= MAX_ROUNDS:
        parser.error(f"--rounds must be between 1 and {MAX_ROUNDS} (every id must be fresh)")
    command = " ".join(["python bench/listing.py", *sys.argv[1:]])
    chunks = chunks_per_source(CONFIG, SIZE)
    asyncio.run(seed_mysql(args.mysql, CATALOG_IDS))

    port = free_port()
    gw_argv = [sys.executable, "-m", "gateway", "serve", "--config", str(CONFIG)]
    gw_argv += ["--port", str(port), "--workers", "1"]
    started = time.monotonic()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    prefix = f"gwbench-listing:{uuid.uuid4().hex[:8]}:"
    cache = {"BENCH_CACHE_URL": "memory://", "BENCH_CACHE_PREFIX": prefix}
    with simulated("listing", args.mysql, **cache) as (logs, env, sim_urls):
        with process("gateway", gw_argv, env, logs) as pid:
            gateway = f"http://127.0.0.1:{port}"
            wait_ready(f"{gateway}/healthz", pid, logs / "gateway.log")
            results = asyncio.run(run(gateway, pid, sim_urls, args.mysql, rounds))
    notes = [
        f"- {rounds} measured rounds per case and setting after {WARMUP_ROUNDS} unmeasured; "
        f"gateway with 1 worker, memory:// cache; total {time.monotonic() - started:.0f} s",
        f"- load average (1 min) before / after: {load_before} / "
        f"{Path('/proc/loadavg').read_text().split()[0]}; tree: {tree_version()}",
        "- per source: the median over rounds of the requests one round caused (a listing, a set "
        f"of {SIZE} singles, one single); catalog is MariaDB's global Com_select delta, so "
        "statements of other clients of the server can add to a round",
        "- CPU ms: the gateway process's time on CPU per round, every thread, from "
        "/proc/<pid>/task/*/schedstat (ns); p50/p99: "
        "wall time of the round's listing, of its set of singles (sent at once), of its single "
        "miss (nearest rank: under 100 rounds, p99 is the slowest)",
        f"- not OK: answers that were not a complete 200 with the expected cache misses; "
        f"server logs: {logs}",
    ]
    text = section(command, results, chunks, notes)
    print(text)
    head = (
        "# Listing benchmark results\n\nProduced by `bench/listing.py`; how to read them: "
        'bench/README.md, section "Listings". Newest run first.'
    )
    prepend_run(args.results, head, text)
    print(f"wrote {args.results}")
    broken = [
        f"{s}/{n}"
        for s, cases in results.items()
        for n, c in cases.items()
        if c.not_ok * 10 > c.answers
    ]
    if broken:
        raise SystemExit(f"more than 10 % of the answers were not OK in: {', '.join(broken)}")


if __name__ == "__main__":
    main()
