"""Chaos under load: the gateway keeps its deadline, its contract and its resources while its
upstreams hang, fail and crash, its MariaDB is killed and restarted, and so is its Redis.

`python reliability/chaos.py [--seconds 60] [--rate 200]` starts a throwaway MariaDB (seeded),
redis-server and the simulated services on spare loopback ports, and `gateway serve` on the
shipped gateway.yaml pointed at them; drives an open-loop load of `--rate` requests a second
(hot, cold and unknown ids) while a fault schedule runs; then checks the pass criteria (see
reliability/README.md), prints a summary and writes it to reliability/RESULTS.md. Exit 1 when a
criterion failed, saying which.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.demo.catalog import seed_mysql  # noqa: E402
from gateway.ops.diagnostics import LoopLag  # noqa: E402
from reliability.harness import (  # noqa: E402
    SERVICES,
    Stack,
    box_cpu,
    control,
    process_cpu_s,
    rss_kb,
    run_and_report,
    run_stamp,
    stack,
    summary_head,
)
from reliability.load import (  # noqa: E402
    IdMix,
    Sample,
    client_session,
    counts,
    get_product,
    latency_figures,
    server_view,
)

DEADLINE_MS = 300  # the shipped gateway.yaml's deadline_ms
SLACK_MS = 50
LIMIT_MS = DEADLINE_MS + SLACK_MS  # no answer may take longer, at the client
CATALOG_IDS = 10_000
HOT_IDS = 50
MAX_IN_FLIGHT = 256
ALLOWED_5XX = (502, 503, 504)
HEALTHY = {"delay_ms": 0, "jitter_ms": 0, "error_rate": 0, "hang_rate": 0}
RESULTS = ROOT / "reliability" / "RESULTS.md"


@dataclass
class FaultLog:
    """What the schedule did, in order, with times from the start of the load."""

    events: list[tuple[float, str]] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    outages_s: dict[str, float] = field(default_factory=dict)

    def add(self, at_s: float, kind: str, what: str) -> None:
        self.events.append((round(at_s, 2), what))
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


def chaos_head(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Return the head of a chaos run's summary: its stamp, length, rate and seed."""
    return {**run_stamp(kind), "seconds": args.seconds, "rate": args.rate, "seed": args.seed}


def upstream_fault(rng: random.Random) -> tuple[str, dict[str, float]]:
    """Return one fault for a simulated service: hangs, 503s, or latency past its timeout."""
    kind = rng.choice(("hang", "error", "slow"))
    if kind == "hang":
        return kind, {"hang_rate": round(rng.uniform(0.2, 1.0), 2)}
    if kind == "error":
        return kind, {"error_rate": round(rng.uniform(0.3, 1.0), 2)}
    return kind, {"delay_ms": rng.randint(60, 400), "jitter_ms": 30}


async def fault_schedule(
    st: Stack, rng: random.Random, start: float, span: tuple[float, float], log: FaultLog
) -> None:
    """Inject faults until span[1] seconds after `start` (loop time): upstream faults from the
    first second (the warm-up then covers their code paths too, so RSS after warm-up is not the
    first fault's high-water mark), and one crash each of MariaDB, the simulators and Redis
    between span[0] and span[1]."""
    loop = asyncio.get_running_loop()
    first, last = span
    length = last - first
    urls = st.sims.urls
    busy_until = dict.fromkeys(SERVICES, 0.0)
    crashes = [
        (first + 0.25 * length, "mariadb_restart"),
        (first + 0.5 * length, "upstream_crash"),
        (first + 0.75 * length, "redis_restart"),
    ]
    heals: set[asyncio.Task[None]] = set()

    def now() -> float:
        return loop.time() - start

    async def heal(name: str, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await asyncio.to_thread(control, urls[name], HEALTHY)

    async def crash(kind: str) -> None:
        began = now()
        if kind == "mariadb_restart":
            log.add(began, kind, "MariaDB kill -9, restarted on its port and datadir")
            await asyncio.to_thread(st.mariadb.crash)
            await asyncio.to_thread(st.mariadb.start)
        elif kind == "redis_restart":
            log.add(began, kind, "Redis kill -9, restarted empty after 1 s")
            await asyncio.to_thread(st.redis.crash)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(st.redis.start)
        else:
            log.add(began, kind, "simulators kill -9 (connections reset), restarted after 0.5 s")
            await asyncio.to_thread(st.sims.crash)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(st.sims.start)
            for name in SERVICES:
                busy_until[name] = 0.0  # a restarted service is healthy again
        log.outages_s[kind] = round(now() - began, 2)

    await asyncio.sleep(max(0.0, 1.0 - now()))
    while now() < last:
        if crashes and now() >= crashes[0][0]:
            await crash(crashes.pop(0)[1])
            continue
        free = [n for n in SERVICES if busy_until[n] <= now()]
        if free:
            name = rng.choice(free)
            kind, body = upstream_fault(rng)
            lasts = rng.uniform(1.0, 3.0)
            if await asyncio.to_thread(control, urls[name], {**HEALTHY, **body}):
                log.add(now(), kind, f"{name} {kind} {body} for {lasts:.1f} s")
                busy_until[name] = now() + lasts
                task = asyncio.create_task(heal(name, lasts))
                heals.add(task)
                task.add_done_callback(heals.discard)
        await asyncio.sleep(min(rng.uniform(0.6, 2.0), max(0.05, last - now())))
    for _, kind in crashes:  # a very short run may not have reached them
        await crash(kind)
    await asyncio.gather(*heals, return_exceptions=True)
    for url in urls.values():
        await asyncio.to_thread(control, url, HEALTHY)


async def open_loop(
    base: str, rate: float, seconds: float, ids: IdMix, start: float
) -> tuple[list[Sample], int, float]:
    """Send `rate` requests a second for `seconds` on a fixed schedule (open loop), at most
    MAX_IN_FLIGHT at once; return the samples, how many were not sent because that many were in
    flight, and the worst delay in sending one."""
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    shed = 0
    worst_send_lag = 0.0
    async with client_session(MAX_IN_FLIGHT) as http:

        async def one(product_id: int) -> None:
            samples.append(await get_product(http, base, product_id, start))

        for i in range(total):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_send_lag = max(worst_send_lag, loop.time() - due)
            if len(tasks) >= MAX_IN_FLIGHT:
                shed += 1
                continue
            task = asyncio.create_task(one(ids.next()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return samples, shed, worst_send_lag * 1000


def admin_state(st: Stack) -> dict[str, Any]:
    """Return the gateway's pools (per source and the cache's) and its task count."""
    report = st.gateway.admin("/admin/sources")
    process = report["process"]
    return {
        "tasks": process["tasks"],
        "pools": {n: int(s["pool"]["in_use"] or 0) for n, s in report["sources"].items()},
        "cache_pool": process["cache_pool"],
        "breakers": {n: s["breaker"] for n, s in report["sources"].items() if s["breaker"]},
        "loop_lag_ms": process.get("loop_lag_ms"),
    }


async def settle(st: Stack, baseline: dict[str, Any], within_s: float) -> dict[str, Any]:
    """Poll until pools and tasks are back to `baseline` (or `within_s` passed); return the last
    state read."""
    ends = time.monotonic() + within_s
    while True:
        state = await asyncio.to_thread(admin_state, st)
        cache_pool = state["cache_pool"] or {}
        back = (
            state["tasks"] <= baseline["tasks"]
            and all(v <= baseline["pools"].get(k, 0) for k, v in state["pools"].items())
            and cache_pool.get("in_use", 0) == 0
            and cache_pool.get("abandoned", 0) == 0
        )
        if back or time.monotonic() > ends:
            state["settled_in_s"] = round(within_s - (ends - time.monotonic()), 1)
            return state
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run the whole chaos experiment; return its summary (with `failures`)."""
    rng = random.Random(args.seed)
    warmup = max(3.0, args.seconds * 0.15)
    tail = max(2.0, args.seconds * 0.15)
    with stack(workdir) as st:
        await seed_mysql(st.catalog_dsn, CATALOG_IDS)
        await asyncio.to_thread(st.gateway.start)
        pid = st.gateway.pid
        loop = asyncio.get_running_loop()
        # Idle baseline, after one request has opened the pools the load will use.
        async with client_session(4) as http:
            await get_product(http, st.gateway.base, 1, loop.time())
        await asyncio.sleep(1.0)
        baseline = await asyncio.to_thread(admin_state, st)
        rss_idle = rss_kb(pid)

        start = loop.time() + 0.2
        faults = FaultLog()
        rss: dict[str, int] = {}
        lag = LoopLag(every_s=0.01)
        lag.start()

        async def sample_rss() -> None:
            await asyncio.sleep(start + warmup - loop.time())
            rss["warm"] = rss_kb(pid)
            rss["peak"] = rss["warm"]
            while True:
                await asyncio.sleep(1.0)
                rss["peak"] = max(rss["peak"], rss_kb(pid))

        cpu: list[dict[str, float]] = []

        async def sample_cpu() -> None:
            # Who had the CPU, second by second: the whole box, the gateway, this client.
            box, gw, me = box_cpu(), process_cpu_s(pid), process_cpu_s(os.getpid())
            while True:
                await asyncio.sleep(1.0)
                box2, gw2, me2 = box_cpu(), process_cpu_s(pid), process_cpu_s(os.getpid())
                span = (box2[1] - box[1]) or 1
                cpu.append(
                    {
                        "at_s": round(loop.time() - start, 1),
                        "box_busy_pct": round((box2[0] - box[0]) / span * 100, 1),
                        "gateway_pct": round((gw2 - gw) * 100, 1),
                        "client_pct": round((me2 - me) * 100, 1),
                        "rss_kb": rss_kb(pid),
                    }
                )
                box, gw, me = box2, gw2, me2

        sampler = asyncio.create_task(sample_rss())
        cpu_sampler = asyncio.create_task(sample_cpu())
        chaos = asyncio.create_task(
            fault_schedule(st, rng, start, (warmup, args.seconds - tail), faults)
        )
        ids = IdMix(HOT_IDS, CATALOG_IDS, hot_share=0.4, missing_share=0.05, rng=rng)
        samples, shed, send_lag_ms = await open_loop(
            st.gateway.base, args.rate, args.seconds, ids, start
        )
        rss["end"] = rss_kb(pid)
        sampler.cancel()
        cpu_sampler.cancel()
        await asyncio.gather(sampler, cpu_sampler, return_exceptions=True)
        await chaos
        await lag.stop()
        st.gateway.check_alive()
        after = await settle(st, baseline, within_s=20.0)
        rss["after_settle"] = rss_kb(pid)
        server = server_view(
            st.gateway.log, LIMIT_MS, ids=(s.request_id for s in samples if s.ms > LIMIT_MS)
        )
        summary = summarize(
            args, samples, shed, send_lag_ms, lag, faults, baseline, after, rss_idle, rss, server
        )
        summary["timeline"] = timeline(samples, cpu, faults, every_s=args.timeline_s)
        summary["cpu"] = {
            key: round(sum(c[key] for c in cpu) / max(1, len(cpu)), 1)
            for key in ("box_busy_pct", "gateway_pct", "client_pct")
        }
        return summary


def timeline(
    samples: list[Sample], cpu: list[dict[str, float]], faults: FaultLog, every_s: float
) -> list[dict[str, Any]]:
    """Return the run in slices of `every_s` seconds: requests, 5xx, requests over the limit,
    the worst latency, the box's and the gateway's CPU, and the faults that began."""
    slices: list[dict[str, Any]] = []
    end = max((s.at_s for s in samples), default=0.0)
    t = 0.0
    while t <= end:
        part = [s for s in samples if t <= s.at_s < t + every_s]
        load = [c for c in cpu if t < c["at_s"] <= t + every_s]
        slices.append(
            {
                "from_s": round(t, 1),
                "requests": len(part),
                "5xx": sum(1 for s in part if s.status >= 500),
                "over": sum(1 for s in part if s.ms > LIMIT_MS),
                "max_ms": round(max((s.ms for s in part), default=0.0)),
                "box_busy_pct": max((c["box_busy_pct"] for c in load), default=None),
                "gateway_pct": max((c["gateway_pct"] for c in load), default=None),
                "rss_kb": max((int(c["rss_kb"]) for c in load), default=None),
                "faults": [what for at, what in faults.events if t <= at < t + every_s],
            }
        )
        t += every_s
    return slices


def summarize(
    args: argparse.Namespace,
    samples: list[Sample],
    shed: int,
    send_lag_ms: float,
    lag: LoopLag,
    faults: FaultLog,
    baseline: dict[str, Any],
    after: dict[str, Any],
    rss_idle: int,
    rss: dict[str, int],
    server: dict[str, Any],
) -> dict[str, Any]:
    """Return the run's figures and the list of failed criteria."""
    answered = [s for s in samples if s.status]
    late = sorted((s for s in answered if s.ms > LIMIT_MS), key=lambda s: -s.ms)
    disallowed = [
        s
        for s in answered
        if s.status >= 500 and not (s.status in ALLOWED_5XX and s.call == "product")
    ]
    no_answer = [s for s in samples if not s.status]
    growth = (rss["end"] - rss["warm"]) / rss["warm"] * 100
    failures = []
    if late:
        worst = late[0].ms
        failures.append(f"{len(late)} requests slower than {LIMIT_MS} ms (worst {worst:.0f} ms)")
    if disallowed:
        failures.append(f"{len(disallowed)} 5xx the contract does not allow: {disallowed[:3]}")
    if no_answer:
        failures.append(
            f"{len(no_answer)} requests got no answer: {counts(s.error for s in no_answer)}"
        )
    if shed:
        failures.append(f"{shed} requests not sent: {MAX_IN_FLIGHT} were in flight")
    if after["tasks"] > baseline["tasks"]:
        failures.append(f"asyncio tasks {baseline['tasks']} before, {after['tasks']} after")
    for name, in_use in after["pools"].items():
        if in_use > baseline["pools"].get(name, 0):
            failures.append(f"pool {name}: {in_use} connections still in use after the run")
    cache_pool = after["cache_pool"] or {}
    if cache_pool.get("in_use", 0) or cache_pool.get("abandoned", 0):
        failures.append(f"Redis pool not back: {cache_pool}")
    if growth >= 10:
        failures.append(f"RSS grew {growth:.1f} % after warm-up ({rss['warm']} -> {rss['end']} kB)")
    if server["error_count"]:
        failures.append(f"{server['error_count']} error lines in the gateway log")
    return {
        **chaos_head("chaos", args),
        "requests": len(samples),
        "achieved_rps": round(len(samples) / args.seconds, 1),
        "statuses": counts(s.status for s in samples),
        "x_cache": counts(s.cache for s in answered),
        "five_xx_calls": counts(f"{s.status} {s.call}" for s in answered if s.status >= 500),
        "no_answer": len(no_answer),
        "shed": shed,
        "faults": dict(sorted(faults.kinds.items())),
        "faults_injected": sum(faults.kinds.values()),
        "outages_s": faults.outages_s,
        "fault_events": faults.events,
        "latency_ms": latency_figures(samples),
        "over_limit": len(late),
        # Each with the gateway's own view of it: a gap between the two is time the request
        # spent outside the gateway's handler (its loop busy or stalled, the client's).
        "worst": [{**asdict(s), "server": server["by_id"].get(s.request_id)} for s in late[:5]]
        or [asdict(max(answered, key=lambda s: s.ms))]
        if answered
        else [],
        "client": {
            "worst_send_lag_ms": round(send_lag_ms, 1),
            "worst_loop_lag_ms": round(lag.worst_ms, 1),
            "loop_lags_over_20ms": lag.stalls,
        },
        # The gateway's own: a stall there delays every request in flight, whatever its sources.
        "gateway_loop_lag_ms": after.get("loop_lag_ms"),
        "server_slow": server["slow"],
        "server_slow_count": server["slow_count"],
        "server_errors": server["errors"],
        "rss_kb": {"idle": rss_idle, **rss, "growth_pct": round(growth, 1)},
        "tasks": {"before": baseline["tasks"], "after": after["tasks"]},
        "pools": {
            "before": {**baseline["pools"], "redis": (baseline["cache_pool"] or {}).get("in_use")},
            "after": {**after["pools"], "redis": cache_pool.get("in_use")},
        },
        "breakers_after": after["breakers"],
        "settled_in_s": after["settled_in_s"],
        "failures": failures,
        "passed": not failures,
    }


def table(s: dict[str, Any]) -> str:
    """Return the summary as a Markdown section."""
    lat, rss, client = s["latency_ms"], s["rss_kb"], s["client"]

    def joined(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "none"

    rows = [
        ("requests", f"{s['requests']} in {s['seconds']} s ({s['achieved_rps']}/s)"),
        ("statuses", joined(s["statuses"])),
        ("X-Cache", joined(s["x_cache"])),
        ("5xx (status, failed call)", joined(s["five_xx_calls"])),
        ("faults injected", f"{s['faults_injected']}: {joined(s['faults'])}"),
        ("outages (s)", joined(s["outages_s"])),
        (
            "latency at the client",
            f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, p99.9 {lat['p99_9']} ms, "
            f"worst {lat['max']} ms",
        ),
        (f"over {LIMIT_MS} ms", str(s["over_limit"])),
        (
            "client loop",
            f"worst lag {client['worst_loop_lag_ms']} ms, "
            f"send lag {client['worst_send_lag_ms']} ms",
        ),
        (
            "RSS",
            f"idle {rss['idle']} kB, after warm-up {rss['warm']} kB, end {rss['end']} kB "
            f"({rss['growth_pct']:+} %), peak {rss['peak']} kB",
        ),
        ("asyncio tasks", f"before {s['tasks']['before']}, after {s['tasks']['after']}"),
        ("mean CPU", joined(s.get("cpu", {}))),
        ("pools in use, before", joined(s["pools"]["before"])),
        ("pools in use, after", f"{joined(s['pools']['after'])} ({s['settled_in_s']} s)"),
        ("result", "PASS" if s["passed"] else "FAIL: " + "; ".join(s["failures"])),
    ]
    lines = [
        *summary_head(
            f"## chaos, {s['when']}, {s['seconds']:g} s at {s['rate']:g}/s (seed {s['seed']})",
            s,
            rows,
        ),
        "",
        "Timeline (box and gateway CPU: the busiest second of the slice, % of one CPU for the "
        "gateway, of all CPUs for the box):",
        "",
        f"| from s | requests | 5xx | over {LIMIT_MS} ms | worst ms | box busy % "
        "| gateway CPU % | RSS kB | faults begun |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *(
            f"| {t['from_s']:g} | {t['requests']} | {t['5xx']} | {t['over']} | {t['max_ms']} "
            f"| {t['box_busy_pct']} | {t['gateway_pct']} | {t.get('rss_kb')} "
            f"| {'; '.join(t['faults'])} |"
            for t in s.get("timeline", [])
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--rate", type=float, default=None, help="requests per second (200; --hostile: 100)"
    )
    parser.add_argument("--seed", type=int, default=None, help="fault schedule and ids")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file to prepend to")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--timeline-s", type=float, default=5.0, help="timeline slice, seconds")
    parser.add_argument(
        "--hostile",
        action="store_true",
        help="hostile upstreams instead: cookies, deep JSON, gzip bombs, 400s (reliability/README)",
    )
    parser.add_argument(
        "--bomb-mb", type=int, default=900, help="--hostile: what a gzip bomb inflates to, MB"
    )
    args = parser.parse_args(argv)
    if args.rate is None:
        args.rate = 100.0 if args.hostile else 200.0
    shortest = 3 if args.hostile else 8
    if args.seconds < shortest or args.seconds > 600 or not 1 <= args.rate <= 2000:
        parser.error(f"--seconds must be within {shortest}..600 and --rate within 1..2000")
    if not 2 <= args.bomb_mb <= 4096:
        parser.error("--bomb-mb must be within 2..4096")
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    if args.hostile:
        from reliability import hostile  # it imports from this module: only when asked

        return run_and_report(
            "chaos-hostile", hostile.run_hostile, args, hostile.table, hostile.notes
        )
    return run_and_report("chaos", run, args, table, _notes)


def _notes(summary: dict[str, Any]) -> list[str]:
    return [f"  gateway log, slow: {entry}" for entry in summary["server_slow"][:5]] + [
        f"  gateway log, error: {line}" for line in summary["server_errors"][:5]
    ]


if __name__ == "__main__":
    sys.exit(main())
