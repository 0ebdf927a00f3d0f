"""Hostile upstreams: answers with cookies, decompression bombs, deep JSON and 400s, and the
chaos run's hostile mode (`python reliability/chaos.py --hostile`) that serves them to a real
`gateway serve` under load and checks that none of it reaches the clients or the gateway's health.

The cookie and bomb answers live in gateway/demo/simulator.py, the one fake upstream server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.demo.catalog import seed_sqlite
from gateway.demo.simulator import (
    Handler,
    UpstreamServer,
    gzip_bomb,
    price_body,
    recs_body,
    reviews_body,
    set_cookies,
    stock_body,
)
from reliability.harness import (
    ADMIN_TOKEN,
    ROOT,
    SERVICES,
    GatewayProcess,
    HarnessError,
    box_cpu,
    process_cpu_s,
    rss_kb,
    summary_head,
)
from reliability.load import IdMix, counts, latency_figures, server_view
from tests.support import free_port

CATALOG_IDS = 10_000
HOT_IDS = 50


def deep_json(levels: int) -> bytes:
    """Return a JSON object nested `levels` deep: `{"a": {"a": ... {} ...}}`."""
    return b'{"a": ' * (levels - 1) + b"{}" + b"}" * (levels - 1)


# --- the hostile services --------------------------------------------------------------------

MODES = ("ok", "cookie", "deep", "bomb", "refuse")
"""What a hostile service may answer: a good body, a good body with Set-Cookie headers, JSON
nested `DEEP_LEVELS` deep, a gzip bomb, or a 400."""

WEIGHTS = {"ok": 0.45, "cookie": 0.2, "deep": 0.1, "bomb": 0.1, "refuse": 0.15}
DEEP_LEVELS = 500
_BODIES: dict[str, Callable[[int, str], bytes]] = {
    "pricing": lambda i, _: price_body(i),
    "inventory": lambda i, _: stock_body(i),
    "reviews": lambda i, _: reviews_body(i),
    "recs": recs_body,
}
_ID = re.compile(r"/(\d{1,7})(?:/|\?|$)")


@dataclass
class HostileService:
    """One simulated service answering in `MODES`, drawn per request; `storm` makes it refuse
    every request (400). Counts its answers and the Cookie headers it was sent."""

    name: str
    rng: random.Random
    bomb: bytes
    storm: bool = False
    answers: Counter[str] = field(default_factory=Counter)
    cookies_sent: list[str] = field(default_factory=list)
    url: str = ""
    _server: UpstreamServer | None = None

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port (`url`), on the shared fake upstream server."""
        self._server = UpstreamServer(record=False)
        self._server.route("/", self._handle)
        self.url = await self._server.start()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if "Cookie" in request.headers:
            self.cookies_sent.append(request.headers["Cookie"])
        mode = "refuse" if self.storm else self.rng.choices(MODES, [WEIGHTS[m] for m in MODES])[0]
        self.answers[mode] += 1
        found = _ID.search(request.raw_path)
        if mode == "refuse" or found is None:
            return _json(b'{"error": "bad request"}', 400)
        if mode == "deep":
            return _json(deep_json(DEEP_LEVELS))
        if mode == "bomb":
            return _json(self.bomb, headers={"Content-Encoding": "gzip"})
        body = _json(_BODIES[self.name](int(found.group(1)), request.query.get("category", "")))
        return await set_cookies(_answer(body))(request) if mode == "cookie" else body


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def _answer(resp: web.Response) -> Handler:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return resp

    return handle


# --- the run ---------------------------------------------------------------------------------

MAX_PEAK_GROWTH_KB = 64 * 1024
"""Peak RSS (VmHWM) may grow at most this much over the RSS after warm-up: a bomb costs ~1 MiB
(`max_bytes`) while it is read, not what it inflates to."""


def _prepare(bomb_mb: int, workdir: Path) -> tuple[bytes, Path, Path]:
    """Return the bomb, a seeded SQLite catalog, and the shipped gateway.yaml with `reviews` on
    httpx (so both clients meet the bombs), both written in `workdir`."""
    text = (ROOT / "gateway.yaml").read_text()
    old = 'reviews:   {kind: http, base_url: "${REVIEWS_URL:-http://127.0.0.1:9103}",'
    if text.count(old) != 1:
        raise HarnessError(f"gateway.yaml no longer has {old!r} once")
    config = workdir / "gateway.yaml"
    config.write_text(text.replace(old, old + " client: httpx,"))
    catalog = workdir / "catalog.db"
    seed_sqlite(str(catalog), CATALOG_IDS)
    return gzip_bomb(bomb_mb * 1024 * 1024), catalog, config


def _status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise HarnessError(f"no {field_name} for pid {pid}")


def _breaker_opens(metrics: str) -> dict[str, float]:
    """Return, per source, how often its breaker went open, from the Prometheus text."""
    opened: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("gateway_breaker_transitions_total{") and 'state="open"' in line:
            source = re.search(r'source="([^"]*)"', line)
            opened[source.group(1) if source else "?"] = float(line.rsplit(" ", 1)[1])
    return opened


async def run_hostile(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run the hostile-upstream chaos: every service answers in `MODES`, pricing (the source
    with a breaker) refuses everything through the middle third; return the summary."""
    from reliability.chaos import (  # chaos imports this module lazily
        ALLOWED_5XX,
        LIMIT_MS,
        chaos_head,
        open_loop,
    )

    rng = random.Random(args.seed)
    bomb, catalog, config = await asyncio.to_thread(_prepare, args.bomb_mb, workdir)
    services = {n: HostileService(n, random.Random(rng.random()), bomb) for n in SERVICES}
    for s in services.values():
        await s.start()
    env = {
        "CATALOG_DSN": f"sqlite:///{catalog}",
        "REDIS_URL": "memory://",
        **{f"{n.upper()}_URL": s.url for n, s in services.items()},
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    gateway = GatewayProcess(workdir, free_port(), env, config=config)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(gateway.start)
        pid = gateway.pid
        ids = IdMix(HOT_IDS, CATALOG_IDS, hot_share=0.1, missing_share=0.05, rng=rng)
        # Warm-up under the same hostile answers, so every path has allocated what it keeps.
        warm_s = max(1.0, args.seconds * 0.2)
        await open_loop(gateway.base, args.rate, warm_s, ids, loop.time() + 0.1)
        rss_warm = rss_kb(pid)
        hwm_warm = _status_kb(pid, "VmHWM")
        start = loop.time() + 0.1
        third = args.seconds / 3

        async def storm() -> None:
            await asyncio.sleep(start + third - loop.time())
            services["pricing"].storm = True
            await asyncio.sleep(third)
            services["pricing"].storm = False

        storming = asyncio.create_task(storm())
        cpu0 = box_cpu(), process_cpu_s(pid), process_cpu_s(os.getpid()), time.monotonic()
        samples, shed, _ = await open_loop(gateway.base, args.rate, args.seconds, ids, start)
        cpu1 = box_cpu(), process_cpu_s(pid), process_cpu_s(os.getpid()), time.monotonic()
        await storming
        gateway.check_alive()
        rss_end, hwm_end = rss_kb(pid), _status_kb(pid, "VmHWM")
        sources = await asyncio.to_thread(gateway.admin, "/admin/sources")
        metrics = await asyncio.to_thread(_get_text, f"{gateway.base}/metrics")
    finally:
        await asyncio.to_thread(gateway.stop)
        for s in services.values():
            await s.close()
    server = server_view(gateway.log, LIMIT_MS)
    answered = [s for s in samples if s.status]
    # The catalog is healthy: only its own failure (a 502/503/504 naming it) could be a 5xx.
    five_xx = [
        s
        for s in answered
        if s.status >= 500 and not (s.status in ALLOWED_5XX and s.call == "product")
    ]
    cookies = {n: len(s.cookies_sent) for n, s in services.items()}
    opened = _breaker_opens(metrics)
    breakers = {n: s["breaker"] for n, s in sources["sources"].items() if s["breaker"]}
    peak_growth = max(hwm_end, hwm_warm) - rss_warm
    failures = []
    if five_xx:
        failures.append(f"{len(five_xx)} 5xx the contract does not allow: {five_xx[:3]}")
    if len(answered) < len(samples) or shed:
        failures.append(f"{len(samples) - len(answered)} requests got no answer, {shed} not sent")
    if any(cookies.values()):
        failures.append(f"cookies sent upstream: {cookies}")
    if peak_growth >= MAX_PEAK_GROWTH_KB:
        failures.append(f"peak RSS grew {peak_growth} kB over the RSS after warm-up")
    if any(opened.values()) or any(state != "closed" for state in breakers.values()):
        failures.append(f"breakers opened: {opened}, now {breakers}")
    if server["error_count"]:
        failures.append(f"{server['error_count']} error lines in the gateway log")
    return {
        **chaos_head("chaos-hostile", args),
        "bomb": {"inflates_to_mb": args.bomb_mb, "bytes": len(bomb)},
        "requests": len(samples),
        "statuses": counts(s.status for s in samples),
        "five_xx_calls": counts(f"{s.status} {s.call}" for s in answered if s.status >= 500),
        "upstream_answers": {n: dict(sorted(s.answers.items())) for n, s in services.items()},
        "cookies_sent_upstream": cookies,
        "breaker_opens": opened,
        "breakers_after": breakers,
        "latency_ms": latency_figures(samples),
        "rss_kb": {
            "warm": rss_warm,
            "end": rss_end,
            "peak": max(hwm_end, hwm_warm),
            "peak_growth": peak_growth,
        },
        "gateway_loop_lag_ms": sources["process"].get("loop_lag_ms"),
        # Who had the CPU during the load: the box (all CPUs), the gateway, and this process
        # (the load and the four hostile services), in % of one CPU for the last two.
        "cpu": {
            "box_busy_pct": round(
                (cpu1[0][0] - cpu0[0][0]) / max(1, cpu1[0][1] - cpu0[0][1]) * 100, 1
            ),
            "gateway_pct": round((cpu1[1] - cpu0[1]) / (cpu1[3] - cpu0[3]) * 100, 1),
            "harness_pct": round((cpu1[2] - cpu0[2]) / (cpu1[3] - cpu0[3]) * 100, 1),
        },
        "server_errors": server["errors"],
        "failures": failures,
        "passed": not failures,
    }


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text: str = resp.read().decode()
        return text


def table(s: dict[str, Any]) -> str:
    """Return the hostile run's summary as a Markdown section."""

    def joined(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "none"

    lat, rss = s["latency_ms"], s["rss_kb"]
    rows = [
        ("requests", f"{s['requests']} in {s['seconds']:g} s"),
        ("statuses", joined(s["statuses"])),
        ("5xx (status, failed call)", joined(s["five_xx_calls"])),
        *((f"{name} answered", joined(answers)) for name, answers in s["upstream_answers"].items()),
        ("bomb", f"{s['bomb']['bytes']} bytes inflating to {s['bomb']['inflates_to_mb']} MB"),
        ("cookies sent upstream", joined(s["cookies_sent_upstream"])),
        ("breakers opened", joined(s["breaker_opens"]) if s["breaker_opens"] else "never"),
        ("breakers after", joined(s["breakers_after"])),
        ("latency at the client", f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms"),
        (
            "RSS",
            f"after warm-up {rss['warm']} kB, end {rss['end']} kB, peak {rss['peak']} kB "
            f"({rss['peak_growth']:+} kB)",
        ),
        ("gateway loop lag", joined(s["gateway_loop_lag_ms"] or {})),
        ("mean CPU during the load", joined(s["cpu"])),
        ("result", "PASS" if s["passed"] else "FAIL: " + "; ".join(s["failures"])),
    ]
    title = (
        f"## chaos, hostile upstreams, {s['when']}, {s['seconds']:g} s at {s['rate']:g}/s "
        f"(seed {s['seed']})"
    )
    return "\n".join(summary_head(title, s, rows)) + "\n"


def notes(summary: dict[str, Any]) -> list[str]:
    return [f"  gateway log, error: {line}" for line in summary["server_errors"][:5]]
