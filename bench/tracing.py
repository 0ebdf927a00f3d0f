"""Benchmark tracing: what exported spans cost a response, and that trace context alone is free.

`python bench/tracing.py [--blocks N] [--quick] [--results PATH]`, from the repository root.

In one run, two gateway processes one after the other (one worker each, the shipped gateway.yaml
on MariaDB, the simulated services and the in-process memory:// cache):
- off: no `tracing:` (trace context is still read or started and sent to every upstream);
- on: `tracing: {sample_ratio: 1.0}` exporting over OTLP/HTTP to a loopback receiver in this
  process (which decodes nothing: it counts bytes).
Each serves sequential product views: misses (an id not asked before) and hits (a few ids asked
again), in blocks; the gateway's CPU per response, every thread (the span processor's included),
from /proc/<pid>/task/*/schedstat. Also, in this process, the µs the always-on part costs a
request (`begin_trace`: parse or start a trace).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.report import prepend_run, tree_version  # noqa: E402
from bench.run import cpu_ns, machine, process, simulated, wait_ready  # noqa: E402
from gateway.core.context import RequestContext, begin_trace  # noqa: E402
from gateway.demo.catalog import seed_mysql  # noqa: E402
from tests.support import free_port  # noqa: E402

CATALOG_IDS = 10_000
HOT_IDS = 20
TIMEOUT = aiohttp.ClientTimeout(total=10)
PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def begin_trace_us(runs: int) -> tuple[float, float]:
    """Return µs per `begin_trace` of a request without and with a client `traceparent`."""
    out = []
    for headers in ({b"host": b"bench"}, {b"host": b"bench", b"traceparent": PARENT}):
        ctx = RequestContext("r", 0.0, headers)
        for _ in range(1000):
            begin_trace(ctx)
        started = time.process_time()
        for _ in range(runs):
            begin_trace(RequestContext("r", 0.0, headers))
        elapsed = time.process_time() - started
        # Less the context's own construction, which every request paid before tracing.
        started = time.process_time()
        for _ in range(runs):
            RequestContext("r", 0.0, headers)
        out.append((elapsed - (time.process_time() - started)) / runs * 1e6)
    return out[0], out[1]


async def receiver() -> tuple[web.AppRunner, str, dict[str, int]]:
    """Start a loopback OTLP/HTTP receiver that counts what it gets; return it and its URL."""
    got = {"exports": 0, "bytes": 0}

    async def export(request: web.Request) -> web.Response:
        got["bytes"] += len(await request.read())
        got["exports"] += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", got


async def measure(
    gateway: str, pid: int, blocks: int, per_block: int, first_id: int
) -> dict[str, float]:
    """Return the gateway's CPU µs per miss and per hit, over alternating blocks."""
    cpu = {"miss": 0, "hit": 0}
    count = {"miss": 0, "hit": 0}
    next_id = first_id
    async with aiohttp.ClientSession() as session:
        for hot in range(first_id, first_id + HOT_IDS):  # the hits' ids, cached once
            async with session.get(f"{gateway}/products/{hot}", timeout=TIMEOUT) as resp:
                await resp.read()
        next_id = first_id + HOT_IDS
        for block in range(blocks + 1):
            for kind in ("miss", "hit"):
                before = cpu_ns(pid)
                for n in range(per_block):
                    if kind == "miss":
                        product = next_id
                        next_id += 1
                    else:
                        product = first_id + n % HOT_IDS
                    url = f"{gateway}/products/{product}"
                    async with session.get(url, timeout=TIMEOUT) as resp:
                        await resp.read()
                        state = resp.headers.get("x-cache")
                        if resp.status != 200 or state != kind.upper():
                            raise SystemExit(f"{url}: {resp.status} {state}, wanted {kind}")
                if block:  # the first block of each warms up, unmeasured
                    cpu[kind] += cpu_ns(pid) - before
                    count[kind] += per_block
    return {k: cpu[k] / count[k] / 1000 for k in cpu}


async def run_gateway(
    name: str,
    config: Path,
    env: dict[str, str],
    logs: Path,
    blocks: int,
    per_block: int,
    first_id: int,
) -> dict[str, float]:
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    argv += ["--port", str(port), "--workers", "1"]
    with process(name, argv, env, logs) as pid:
        gateway = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_ready, f"{gateway}/healthz", pid, logs / f"{name}.log")
        return await measure(gateway, pid, blocks, per_block, first_id)


async def both(
    env: dict[str, str], logs: Path, blocks: int, per_block: int
) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    text = (ROOT / "gateway.yaml").read_text()
    off = logs / "gateway.off.yaml"
    off.write_text(text)
    runner, url, got = await receiver()
    try:
        on = logs / "gateway.on.yaml"
        tracing = f"tracing: {{otlp_endpoint: '{url}', sample_ratio: 1.0, service_name: bench}}\n"
        on.write_text(text.replace("version: 1\n", "version: 1\n" + tracing, 1))
        per_run = HOT_IDS + (blocks + 1) * per_block
        cost_off = await run_gateway("off", off, env, logs, blocks, per_block, 1)
        cost_on = await run_gateway("on", on, env, logs, blocks, per_block, 1 + per_run)
    finally:
        await runner.cleanup()
    return cost_off, cost_on, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=10, help="measured blocks (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 blocks of 30: a smoke run")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS-tracing.md")
    parser.add_argument("--mysql", default="mysql://root@127.0.0.1:3306/gwbench")
    args = parser.parse_args()
    blocks, per_block = (2, 30) if args.quick else (args.blocks, 200)
    if 2 * (HOT_IDS + (blocks + 1) * per_block) > CATALOG_IDS:
        raise SystemExit(f"--blocks {blocks} asks for more misses than {CATALOG_IDS} products")
    asyncio.run(seed_mysql(args.mysql, CATALOG_IDS))
    plain_us, parent_us = begin_trace_us(5_000 if args.quick else 200_000)

    extra = {"REDIS_URL": "memory://", "GATEWAY_LOG_LEVEL": "warning"}
    with simulated("tracing", args.mysql, **extra) as (logs, env, _):
        off, on, got = asyncio.run(both(env, logs, blocks, per_block))
    if not got["exports"]:
        raise SystemExit("the OTLP receiver got nothing: tracing did not export")

    command = " ".join(["python bench/tracing.py", *sys.argv[1:]])
    lines = [
        f"## {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- machine: {machine()}; tree: {tree_version()}",
        f"- command: `{command}`; {blocks} measured blocks of {per_block} misses and of "
        f"{per_block} hits per gateway; access lines off (GATEWAY_LOG_LEVEL=warning)",
        "",
        "| gateway CPU per response, µs | tracing off | on, ratio 1.0 | on / off |",
        "|---|--:|--:|--:|",
        *(
            f"| product view, {kind} | {off[kind]:.0f} | {on[kind]:.0f} | "
            f"{on[kind] / off[kind]:.2f} |"
            for kind in ("miss", "hit")
        ),
        "",
        f"- always on, in process: `begin_trace` {plain_us:.2f} µs per request starting a "
        f"trace, {parent_us:.2f} µs continuing a client's",
        f"- OTLP receiver: {got['exports']} exports, {got['bytes'] / 1e6:.1f} MB",
    ]
    text = "\n".join(lines)
    print(text)
    prepend_run(
        args.results, "# Tracing benchmark results\n\nProduced by `bench/tracing.py`.", text
    )
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
