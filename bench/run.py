"""Run the side-by-side benchmark: the gateway against the hand-written baseline.

One command, bounded: `python bench/run.py [--quick] [--duration S] [--only baseline|gateway]`.
It installs wrk if missing, seeds MariaDB (`gwbench`), starts the simulated upstreams, the
baseline and the gateway (one worker) as separate processes, runs the scenarios of issue 6 and
writes a table to bench/RESULTS.md (newest run first). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.report import prepend_run, tree_version  # noqa: E402
from gateway.demo.catalog import seed_mysql  # noqa: E402
from gateway.demo.simulator import SERVICES  # noqa: E402
from tests.support import free_port  # noqa: E402

LATENCY = {"pricing": 20, "inventory": 30, "reviews": 50, "recs": 40}
JITTER_MS = 5
DEADLINE_MS = 300
HOT_IDS = 100
CATALOG_IDS = 10_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    """One load scenario: upstream behaviour, ids, path and connections."""

    name: str
    what: str
    connections: int = 32
    ids: tuple[int, int] = (1, CATALOG_IDS)
    cached: bool = False
    delays: bool = False
    faults: bool = False
    targets: tuple[str, ...] = ("baseline", "gateway")
    path: str = ""
    """The gateway's path, when not the one `cached` implies (the baseline's is /products/)."""
    against: str = ""
    """The baseline scenario a gateway-only one is compared with."""


SCENARIOS = (
    Scenario("miss", "upstreams 0 ms, random ids over 10,000, no cache", 8),
    Scenario("latency-8", "upstreams 20/30/50/40 ms +-5, 8 connections", 8, delays=True),
    Scenario("latency-64", "upstreams 20/30/50/40 ms +-5, 64 connections", 64, delays=True),
    Scenario(
        "hit",
        "hot set of 100 ids, cache on (gateway only)",
        ids=(1, HOT_IDS),
        cached=True,
        targets=("gateway",),
    ),
    Scenario("faults", "every upstream 5 % 503s and 3 % hangs (30 s)", 8, faults=True),
    Scenario(
        "saturation",
        "upstreams 0 ms, random ids, 64 connections; the endpoint's cache on Redis never stores",
        64,
        path="/nostore/products/",
        targets=("baseline", "gateway-redis"),
    ),
    Scenario(
        "hit-redis",
        "hot set of 100 ids, cache on Redis, no near tier (gateway only)",
        ids=(1, HOT_IDS),
        cached=True,
        targets=("gateway-redis",),
        against="miss",
    ),
)
AGAINST = {"hit": "miss", **{s.name: s.against for s in SCENARIOS if s.against}}
"""Gateway-only scenarios and the baseline scenario each is compared with."""
GATEWAYS = ("gateway", "gateway-redis")


@dataclass
class Result:
    """What one target did in one scenario."""

    scenario: str
    target: str
    connections: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    non2xx: int = 0
    errors: int = 0
    cpu_ms_per_response: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


# --- processes ------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """Return utime+stime of a process and its live descendants, plus its reaped children's."""
    total = 0
    for i, p in enumerate(_tree(pid)):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
        if i == 0:
            total += int(fields[13]) + int(fields[14])
    return total


def cpu_ns(pid: int) -> int:
    """Return the nanoseconds on CPU of a process and its live descendants, every thread, from
    /proc/*/task/*/schedstat: exact, where utime and stime count 10 ms clock ticks."""
    total = 0
    for p in _tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


@contextmanager
def simulated(
    name: str, mysql: str, **extra: str
) -> Iterator[tuple[Path, dict[str, str], dict[str, str]]]:
    """Start the simulated services on free loopback ports for one bench run and wait until they
    answer; yield its log directory (under `BENCH_LOG_DIR`, default /tmp), the environment that
    points a gateway at them and at the catalog `mysql` (plus `extra`), and their URLs."""
    logs = Path(os.environ.get("BENCH_LOG_DIR", "/tmp")) / f"gwbench-{name}-{uuid.uuid4().hex[:8]}"
    logs.mkdir(parents=True)
    base = free_port(4)
    sim_urls = {service: f"http://127.0.0.1:{base + i}" for i, service in enumerate(SERVICES)}
    env = os.environ | {
        "CATALOG_DSN": mysql,
        "PYTHONUNBUFFERED": "1",
        **extra,
        **{f"{service.upper()}_URL": url for service, url in sim_urls.items()},
    }
    argv = [sys.executable, "-m", "gateway.demo.simulator", "--port-base", str(base)]
    with process("simulator", argv, env, logs) as sim_pid:
        wait_ready(f"{sim_urls['recs']}/_stats", sim_pid, logs / "simulator.log")
        yield logs, env, sim_urls


def _tree(pid: int) -> Iterator[int]:
    yield pid
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield from _tree(int(child))


@contextmanager
def process(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Iterator[int]:
    """Run a server process for the block; stop it with SIGTERM, SIGKILL after 5 s."""
    log = (log_dir / f"{name}.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_ready(url: str, pid: int, log: Path, timeout_s: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail with the process log if it dies or never does."""
    ends = time.monotonic() + timeout_s
    while time.monotonic() < ends:
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            raise SystemExit(f"{url}: the server exited; its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout_s} s; log:\n{log.read_text()[-3000:]}")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def gateway_available(python: str) -> bool:
    """Return whether this checkout has `gateway serve` (the CLI the bench drives)."""
    probe = subprocess.run(
        [python, "-m", "gateway", "serve", "--help"], cwd=ROOT, capture_output=True, timeout=60
    )
    return probe.returncode == 0


# --- simulator control ----------------------------------------------------------------------


def control(urls: dict[str, str], scenario: Scenario) -> None:
    """Set every simulated service's behaviour for `scenario`."""
    for name, url in urls.items():
        body: dict[str, float] = {"delay_ms": 0, "jitter_ms": 0, "error_rate": 0, "hang_rate": 0}
        if scenario.delays:
            body |= {"delay_ms": LATENCY[name], "jitter_ms": JITTER_MS}
        if scenario.faults:
            body |= {"error_rate": 0.05, "hang_rate": 0.03}
        _post(f"{url}/_control", body)


def _post(url: str, body: object) -> dict[str, object]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return dict(json.loads(resp.read()))


def upstream_counts(urls: dict[str, str]) -> dict[str, int]:
    """Return the request counters of the simulated services."""
    out = {}
    for name, url in urls.items():
        with urllib.request.urlopen(f"{url}/_stats", timeout=5) as resp:
            out[name] = json.loads(resp.read())["requests"]
    return out


# --- load ------------------------------------------------------------------------------------


def run_wrk(url: str, scenario: Scenario, seconds: float, pid: int) -> Result:
    """Load `url` with wrk for `seconds`; return the figures and the server's CPU per response."""
    env = os.environ | {"BENCH_ID_LO": str(scenario.ids[0]), "BENCH_ID_HI": str(scenario.ids[1])}
    argv = [
        "wrk",
        "-t1",
        f"-c{scenario.connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(BENCH / "random_ids.lua"),
        url,
    ]
    before = cpu_ticks(pid)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    used_ms = (cpu_ticks(pid) - before) * 1000 / CLK_TCK
    if out.returncode != 0:
        raise SystemExit(f"wrk failed: {out.stderr or out.stdout}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    w = json.loads(line.removeprefix("BENCH_JSON "))
    return Result(
        scenario=scenario.name,
        target="",
        connections=scenario.connections,
        requests=w["requests"],
        rps=w["requests"] / (w["duration_us"] / 1e6),
        p50_ms=w["p50_us"] / 1000,
        p99_ms=w["p99_us"] / 1000,
        max_ms=w["max_us"] / 1000,
        non2xx=w["status"],
        errors=w["connect"] + w["read"] + w["write"] + w["timeout"],
        cpu_ms_per_response=used_ms / max(1, w["requests"]),
    )


async def stampede(url: str, sim_urls: dict[str, str], pid: int, n: int = 200) -> Result:
    """Fire `n` concurrent requests at one cold key; count the upstream calls they caused."""
    for sim in sim_urls.values():
        _post(f"{sim}/_stats/reset", {})
    latencies: list[float] = []
    statuses: list[int] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
                    statuses.append(resp.status)
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - started)

        before = cpu_ticks(pid)
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - started
        used_ms = (cpu_ticks(pid) - before) * 1000 / CLK_TCK
    latencies.sort()
    calls = upstream_counts(sim_urls)
    return Result(
        scenario="stampede",
        target="",
        connections=n,
        requests=n,
        rps=n / wall,
        p50_ms=latencies[n // 2] * 1000,
        p99_ms=latencies[int(n * 0.99) - 1] * 1000,
        max_ms=latencies[-1] * 1000,
        non2xx=sum(1 for s in statuses if not 200 <= s < 300),
        errors=errors,
        cpu_ms_per_response=used_ms / n,
        extra={"upstream_calls": calls},
    )


# --- report ----------------------------------------------------------------------------------


def machine() -> str:
    """Return a one-line description of this machine and Python."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{os.cpu_count()} CPUs ({os.sysconf('SC_NPROCESSORS_ONLN')} online), {model}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(results: list[Result]) -> list[str]:
    """Return the markdown table of all results, each gateway row with its ratios to baseline."""
    base = {r.scenario: r for r in results if r.target == "baseline"}
    rows = [
        "| scenario | target | conns | req/s | p50 ms | p99 ms | max ms | non-2xx | errors "
        "| CPU ms/resp | CPU ratio | req/s ratio | p99 ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b = base.get(AGAINST.get(r.scenario, r.scenario))
        ratios = ["", "", ""]
        if r.target in GATEWAYS and b:
            ratios = [
                _ratio(r.cpu_ms_per_response, b.cpu_ms_per_response),
                _ratio(r.rps, b.rps),
                _ratio(r.p99_ms, b.p99_ms),
            ]
            if r.scenario in AGAINST:
                ratios = [f"{ratios[0]} (vs miss)", f"{ratios[1]} (vs miss)", ""]
        rows.append(
            f"| {r.scenario} | {r.target} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.1f} "
            f"| {r.p99_ms:.1f} | {r.max_ms:.1f} | {r.non2xx} | {r.errors} "
            f"| {r.cpu_ms_per_response:.3f} | {' | '.join(ratios)} |"
        )
    return rows


def targets(results: list[Result]) -> list[str]:
    """Return issue 6's targets, each marked met, not met or not measured."""
    got = {(r.scenario, r.target): r for r in results}

    def mark(ok: bool | None) -> str:
        return "not measured" if ok is None else ("**met**" if ok else "**not met**")

    def both(scenario: str, against: str) -> tuple[Result, Result] | None:
        pair = got.get((scenario, "gateway")), got.get((against, "baseline"))
        return (pair[0], pair[1]) if pair[0] and pair[1] else None

    lines = []
    miss = both("miss", "miss")
    v = miss[0].cpu_ms_per_response / miss[1].cpu_ms_per_response if miss else None
    lines.append(
        f"- miss-path CPU per response <= 1.0x baseline: "
        f"{mark(None if v is None else v <= 1.0)}" + (f" ({v:.2f}x)" if v else "")
    )
    hit = both("hit", "miss")
    v = hit[0].cpu_ms_per_response / hit[1].cpu_ms_per_response if hit else None
    lines.append(
        f"- hit-path CPU per response (memory) <= 0.10x baseline miss path: "
        f"{mark(None if v is None else v <= 0.10)}" + (f" ({v:.2f}x)" if v else "")
    )
    redis_hit = got.get(("hit-redis", "gateway-redis"))
    v = redis_hit.cpu_ms_per_response / miss[1].cpu_ms_per_response if redis_hit and miss else None
    lines.append(
        f"- hit-path CPU per response (Redis) <= 0.15x baseline miss path: "
        f"{mark(None if v is None else v <= 0.15)}" + (f" ({v:.2f}x)" if v else "")
    )
    sat = got.get(("saturation", "gateway-redis")), got.get(("saturation", "baseline"))
    v = sat[0].cpu_ms_per_response / sat[1].cpu_ms_per_response if sat[0] and sat[1] else None
    lines.append(
        f"- saturation (64 connections, cache on Redis) miss CPU per response <= 1.2x baseline: "
        f"{mark(None if v is None else v <= 1.2)}" + (f" ({v:.2f}x)" if v else "")
    )
    if sat[0] and sat[1]:
        lines.append(
            f"- saturation: no 504 the baseline does not also have: "
            f"{mark(sat[0].non2xx <= sat[1].non2xx)} "
            f"(non-2xx {sat[0].non2xx} against {sat[1].non2xx})"
        )
    slowest = max(LATENCY.values())
    lat = got.get(("latency-8", "gateway"))
    lines.append(
        f"- latency at 8 connections p50 <= slowest upstream + 1 ms ({slowest + 1} ms): "
        f"{mark(None if lat is None else lat.p50_ms <= slowest + 1)}"
        + (f" ({lat.p50_ms:.1f} ms)" if lat else "")
    )
    faults = got.get(("faults", "gateway"))
    lines.append(
        f"- faults p100 <= deadline + 10 ms ({DEADLINE_MS + 10} ms): "
        f"{mark(None if faults is None else faults.max_ms <= DEADLINE_MS + 10)}"
        + (f" ({faults.max_ms:.1f} ms)" if faults else "")
    )
    st = got.get(("stampede", "gateway"))
    calls = st.extra.get("upstream_calls") if st else None
    ok = None if not isinstance(calls, dict) else all(c == 1 for c in calls.values())
    lines.append(f"- stampede: 1 call per upstream: {mark(ok)}" + (f" ({calls})" if calls else ""))
    return lines


def write_results(path: Path, command: str, results: list[Result], notes: list[str]) -> None:
    """Insert this run's section at the top of the results file (newest first)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    stampedes = [
        f"- stampede upstream calls, {r.target}: {r.extra['upstream_calls']}"
        for r in results
        if r.scenario == "stampede"
    ]
    section = "\n".join(
        [
            f"## {stamp}",
            "",
            f"- machine: {machine()}",
            f"- command: `{command}`",
            *notes,
            "",
            *table(results),
            "",
            *stampedes,
            "",
            "Targets (gateway, issue 6):",
            "",
            *targets(results),
            "",
            "",
        ]
    )
    head = (
        "# Benchmark results\n\nProduced by `bench/run.py`; how to read them: bench/README.md.\n"
        "Newest run first."
    )
    prepend_run(path, head, section)


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    """Parse the command line, run every scenario for every target and write the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 s per scenario: a smoke run")
    parser.add_argument("--duration", type=float, help="seconds of load per scenario and target")
    parser.add_argument("--only", choices=("baseline", "gateway"), help="run one target only")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--mysql", default="mysql://root@127.0.0.1:3306/gwbench")
    parser.add_argument(
        "--cache-url",
        default="memory://",
        help="the gateway's cache, e.g. redis://127.0.0.1:6379/0",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="the cache of the second gateway (gateway-redis: scenarios saturation, hit-redis)",
    )
    parser.add_argument("--scenarios", help="comma-separated subset, e.g. miss,hit,stampede")
    args = parser.parse_args()
    seconds = args.duration or (1.0 if args.quick else 15.0)
    warmup = 1.0 if args.quick else 3.0
    wanted = set(args.scenarios.split(",")) if args.scenarios else None
    command = " ".join(["python bench/run.py", *sys.argv[1:]])
    python = sys.executable
    run_targets = [t for t in ("baseline", "gateway") if args.only in (None, t)]
    if "gateway" in run_targets and not (
        wanted and wanted.isdisjoint(s.name for s in SCENARIOS if "gateway-redis" in s.targets)
    ):
        run_targets.append("gateway-redis")
    if "gateway" in run_targets and not gateway_available(python):
        raise SystemExit("`gateway serve` is not available in this checkout; use --only baseline")

    if shutil.which("wrk") is None:
        subprocess.run(["bash", str(BENCH / "install_wrk.sh")], check=True, timeout=300)
    asyncio.run(seed_mysql(args.mysql, CATALOG_IDS))

    logs = Path(os.environ.get("BENCH_LOG_DIR", "/tmp")) / f"gwbench-{uuid.uuid4().hex[:8]}"
    logs.mkdir(parents=True)
    base = free_port(4)
    sim_urls = {name: f"http://127.0.0.1:{base + i}" for i, name in enumerate(SERVICES)}
    ports = {"baseline": free_port(), "gateway": free_port(), "gateway-redis": free_port()}
    prefix = f"gwbench:{uuid.uuid4().hex[:8]}:"
    env = os.environ | {
        "CATALOG_DSN": args.mysql,
        "BENCH_CACHE_URL": args.cache_url,
        "BENCH_CACHE_PREFIX": prefix,
        "PYTHONUNBUFFERED": "1",
        **{f"{name.upper()}_URL": url for name, url in sim_urls.items()},
    }
    argv = {
        "baseline": [
            python,
            str(BENCH / "baseline.py"),
            "--port",
            str(ports["baseline"]),
            "--mysql",
            args.mysql,
            "--upstreams",
            ",".join(sim_urls.values()),
        ],
        "gateway": [
            python,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(BENCH / "gateway.bench.yaml"),
            "--port",
            str(ports["gateway"]),
            "--workers",
            "1",
        ],
    }
    results: list[Result] = []
    started = time.monotonic()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    sim_argv = [python, "-m", "gateway.demo.simulator", "--port-base", str(base)]
    with process("simulator", sim_argv, env, logs) as sim_pid:
        wait_ready(f"{sim_urls['recs']}/_stats", sim_pid, logs / "simulator.log")
        with ExitStack() as stack:
            envs = {t: env for t in run_targets}
            # The same gateway, with its cache on Redis (and a key prefix of its own).
            envs["gateway-redis"] = env | {
                "BENCH_CACHE_URL": args.redis_url,
                "BENCH_CACHE_PREFIX": f"{prefix}r:",
            }
            argv["gateway-redis"] = [
                *(
                    str(ports["gateway-redis"]) if a == str(ports["gateway"]) else a
                    for a in argv["gateway"]
                )
            ]
            pids = {t: stack.enter_context(process(t, argv[t], envs[t], logs)) for t in run_targets}
            for t in run_targets:
                wait_ready(f"http://127.0.0.1:{ports[t]}/healthz", pids[t], logs / f"{t}.log")
            for sc in SCENARIOS:
                if wanted and sc.name not in wanted:
                    continue
                control(sim_urls, sc)
                for t in run_targets:
                    if t not in sc.targets:
                        continue
                    prefix_path = "/cached/products/" if sc.cached else "/products/"
                    if sc.path and t != "baseline":
                        prefix_path = sc.path
                    url = f"http://127.0.0.1:{ports[t]}{prefix_path}"
                    run_wrk(url, sc, warmup, pids[t])
                    r = run_wrk(url, sc, seconds, pids[t])
                    r.target = t
                    results.append(r)
                    print(
                        f"{sc.name:<11} {t:<9} {r.rps:8.0f} req/s  p50 {r.p50_ms:6.1f} ms  "
                        f"p99 {r.p99_ms:6.1f} ms  max {r.max_ms:7.1f} ms  non2xx {r.non2xx:5d}"
                        f"  CPU {r.cpu_ms_per_response:.3f} ms/resp",
                        flush=True,
                    )
            if not wanted or "stampede" in wanted:
                control(sim_urls, Scenario("stampede", "", delays=True))
                for i, t in enumerate(run_targets):
                    # A cold key per target: an id that no earlier scenario could have cached.
                    path = "/cached/products/" if t == "gateway" else "/products/"
                    cold = CATALOG_IDS - 1 - i
                    r = asyncio.run(
                        stampede(f"http://127.0.0.1:{ports[t]}{path}{cold}", sim_urls, pids[t])
                    )
                    r.target = t
                    results.append(r)
                    print(
                        f"stampede    {t:<9} upstream calls {r.extra['upstream_calls']}  "
                        f"p50 {r.p50_ms:.1f} ms  non2xx {r.non2xx}",
                        flush=True,
                    )
    notes = [
        f"- load: wrk -t1, {seconds:g} s per scenario and target after {warmup:g} s of warm-up; "
        f"gateway with 1 worker, cache {args.cache_url}; total {time.monotonic() - started:.0f} s",
        f"- load average (1 min) before / after: {load_before} / "
        f"{Path('/proc/loadavg').read_text().split()[0]} (other work on the machine inflates "
        f"every figure; compare rows of one run); tree: {tree_version()}",
        f"- server logs: {logs}",
    ]
    write_results(args.results, command, results, notes)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
