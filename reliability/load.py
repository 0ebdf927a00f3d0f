"""The client side of the reliability runs: one GET per product id, timed from send to last byte,
and the figures a run reports (percentiles, counts, the gateway's own log of slow requests)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

CLIENT_TIMEOUT_S = 5.0
"""A request the gateway has not answered by then counts as a client error (and is far past any
deadline the gateway has)."""


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it."""

    at_s: float  # when it was sent, from the start of the load
    product_id: int
    status: int  # 0: no answer (connection error or client timeout)
    ms: float
    cache: str = ""
    call: str | None = None  # a 5xx body's error.call
    error: str | None = None
    request_id: str = ""


@dataclass
class IdMix:
    """Product ids: a hot set, a cold range and a share of ids the catalog does not have."""

    hot: int
    catalog: int
    hot_share: float
    missing_share: float
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> int:
        draw = self.rng.random()
        if draw < self.missing_share:
            return self.rng.randint(self.catalog + 1, self.catalog * 2)
        if draw < self.missing_share + self.hot_share:
            return self.rng.randint(1, self.hot)
        return self.rng.randint(self.hot + 1, self.catalog)


async def get_product(
    http: aiohttp.ClientSession, base: str, product_id: int, started: float
) -> Sample:
    """GET /products/{id}; return what came back and how long it took, never raising for a
    failed request."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with http.get(f"{base}/products/{product_id}") as resp:
            body = await resp.read()
            ms = (loop.time() - t0) * 1000
            call = None
            if resp.status >= 500:
                try:
                    call = str(orjson.loads(body)["error"]["call"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    call = "<no JSON error body>"
            return Sample(
                t0 - started,
                product_id,
                resp.status,
                ms,
                resp.headers.get("x-cache", ""),
                call,
                request_id=resp.headers.get("x-request-id", ""),
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        ms = (loop.time() - t0) * 1000
        return Sample(t0 - started, product_id, 0, ms, error=type(exc).__name__)


def client_session(limit: int) -> aiohttp.ClientSession:
    """Return a keep-alive client session with at most `limit` connections."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S),
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) of already sorted values, nearest rank."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def latency_figures(samples: Iterable[Sample]) -> dict[str, float]:
    """Return p50, p90, p99, p99.9 and max of answered requests, in ms."""
    ms = sorted(s.ms for s in samples if s.status)
    return {
        "p50": round(percentile(ms, 50), 1),
        "p90": round(percentile(ms, 90), 1),
        "p99": round(percentile(ms, 99), 1),
        "p99_9": round(percentile(ms, 99.9), 1),
        "max": round(ms[-1], 1) if ms else 0.0,
    }


def counts(values: Iterable[Any]) -> dict[str, int]:
    """Return how often each value occurs, keys as strings, sorted."""
    return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: str(kv[0]))}


def server_view(
    log: Path, over_ms: float, limit: int = 8, ids: Iterable[str] = ()
) -> dict[str, Any]:
    """Read the gateway's JSON log: its slowest access lines past `over_ms` (the gateway's own
    time, per call), 5xx access lines, lines logged at error level, and the access lines of the
    requests `ids` (those a client found slow: the gateway's view of them)."""
    wanted = set(ids)
    by_id: dict[str, dict[str, Any]] = {}
    slow: list[dict[str, Any]] = []
    errors: list[str] = []
    requests = 0
    statuses: Counter[int] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            if "Traceback" in line or "ERROR" in line:
                errors.append(line[:300])
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "critical"):
            errors.append(line[:600])
        if entry.get("event") != "request":
            continue
        requests += 1
        statuses[int(entry.get("status", 0))] += 1
        if entry.get("request_id") in wanted:
            by_id[entry["request_id"]] = _compact(entry)
        if float(entry.get("ms", 0)) > over_ms:
            slow.append(_compact(entry))
    slow.sort(key=lambda e: -float(e["ms"]))
    return {
        "requests": requests,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "slow": slow[:limit],
        "slow_count": len(slow),
        "by_id": by_id,
        "errors": errors[:limit],
        "error_count": len(errors),
    }


def _compact(entry: dict[str, Any]) -> dict[str, Any]:
    """Return an access line's figures: time, status, cache, fan-out and each call's outcome."""
    return {
        "ms": entry.get("ms"),
        "status": entry.get("status"),
        "cache": entry.get("cache"),
        "request_id": entry.get("request_id"),
        "fanout": entry.get("fanout"),
        "calls": {k: [v.get("outcome"), v.get("ms")] for k, v in entry["calls"].items()}
        if isinstance(entry.get("calls"), dict)
        else entry.get("calls"),
    }
