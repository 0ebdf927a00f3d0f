"""The admin API under `/admin`: effective config, reload, live per-source statistics, dashboard
and cache purge, behind `Authorization: Bearer $GATEWAY_ADMIN_TOKEN`.

Without a token there is no admin at all (404): an open admin is worse than none.
"""

from __future__ import annotations

import asyncio
import os
import time
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import structlog
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cache.store import CacheUnavailable
from gateway.config.redact import redact_text
from gateway.core.errors import ConfigError, SourceError
from gateway.core.seeing import bearer_ok
from gateway.ops.admin_models import (
    EffectiveConfig,
    Failure,
    Message,
    Purged,
    Refused,
    Reloaded,
    SourcesReport,
    Unauthorized,
)
from gateway.ops.diagnostics import LoopLag, memory_report, process_report
from gateway.ops.metrics import BREAKER_VALUES, live_samples
from gateway.ops.stats import cache_summary, merge_windows, summary
from gateway.ops.token import TOKEN_ENV

if TYPE_CHECKING:
    from gateway.config.loader import LoadedConfig
    from gateway.runtime import Runtime
    from gateway.workers import Everywhere, WorkerDir

_log = structlog.get_logger("gateway.admin")


class Administered(Protocol):
    """The running gateway, as the admin routes see it (`gateway.app.Gateway`)."""

    loaded: LoadedConfig
    lag: LoopLag
    workers: WorkerDir | None

    def current(self) -> Runtime: ...

    async def reload_all(
        self, *, only_if_changed: bool = False
    ) -> tuple[Runtime, Everywhere] | None: ...


class PurgeRequest(BaseModel):
    """What to remove from the cache: composite keys, or every key under some tags."""

    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list, max_length=10_000)
    tags: list[str] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _something(self) -> PurgeRequest:
        if not self.keys and not self.tags:
            raise ValueError("give keys or tags (or both)")
        return self


# Declares the scheme in the OpenAPI (`adminToken`); the check itself is `authorizer`'s.
_BEARER = Depends(
    HTTPBearer(auto_error=False, scheme_name="adminToken", description=f"the value of {TOKEN_ENV}")
)


def authorizer(token: str) -> Any:
    """Return the dependency that lets a request through only with the admin token.

    The token comes in `Authorization: Bearer ...`; the dashboard page, which a browser opens
    by URL, may carry it as `?token=` instead (query strings stay out of our access log).
    """
    expected = token.encode()

    async def authorize(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, _BEARER]
    ) -> None:
        if credentials is not None:
            given = credentials.credentials
        else:
            given = request.query_params.get("token", "") if request.method == "GET" else ""
        if not bearer_ok(given.encode(), expected):
            raise HTTPException(
                401,
                "admin needs Authorization: Bearer <token>",
                headers={"www-authenticate": 'Bearer realm="gateway admin"'},
            )

    return authorize


def router(gw: Administered, token: str) -> APIRouter:
    """Return the admin routes for `gw`, each behind the token."""
    api = APIRouter(
        prefix="/admin",
        tags=["admin"],
        dependencies=[Depends(authorizer(token))],
        responses={
            401: {
                "model": Unauthorized,
                "description": "no admin token, or a wrong one",
                "headers": {
                    "WWW-Authenticate": {
                        "description": "How to send the token.",
                        "schema": {"type": "string"},
                        "required": True,
                    }
                },
            }
        },
    )

    @api.get("/config", response_model=EffectiveConfig)
    async def config() -> JSONResponse:
        """The effective config, every secret replaced by ***."""
        return JSONResponse({"file": gw.loaded.file, "config": gw.loaded.redacted()})

    @api.post(
        "/reload",
        response_model=Reloaded,
        responses={
            400: {
                "model": Refused,
                "description": "the file is invalid: its `file:line` problems; nothing changed",
            },
            502: {
                "model": Failure | Reloaded,
                "description": "a new source could not start (nothing changed), or some workers "
                "did not reload (`workers.failed` says which and why)",
            },
        },
    )
    async def reload() -> JSONResponse:
        """Validate the config file again and swap every worker to it; a bad file changes
        nothing (400). `workers` says how many reloaded and which did not."""
        old = gw.current()
        try:
            done = await gw.reload_all()
        except ConfigError as exc:
            _log.warning("config_reload_refused", problems=[str(p) for p in exc.problems])
            return JSONResponse(
                {"error": "invalid config", "problems": [str(p) for p in exc.problems]},
                status_code=400,
            )
        except SourceError as exc:
            detail = redact_text(str(exc), gw.loaded.secrets)
            _log.warning("config_reload_failed", error=detail)
            return JSONResponse(
                {"error": "a new source could not start", "detail": detail}, status_code=502
            )
        assert done is not None  # only a watcher asks to skip an unchanged file
        new, everywhere = done
        body = {
            "status": "partly reloaded" if everywhere.failed else "reloaded",
            "file": new.loaded.file,
            **changes(old, new),
            "workers": everywhere.report(),
        }
        return JSONResponse(body, status_code=502 if everywhere.failed else 200)

    @api.get("/sources", response_model=SourcesReport)
    async def sources() -> JSONResponse:
        """Live statistics of every source over the sliding window, with why its calls failed;
        under `--workers N`, every worker's merged (see `workers`)."""
        report = sources_report(gw.current(), gw.lag)
        if gw.workers is not None:
            siblings = await asyncio.to_thread(gw.workers.snapshots)
            own = worker_snapshot(gw.current(), gw.lag, gw.workers.applied)
            report = merged_report(report, own, siblings)
        return JSONResponse(report)

    @api.get(
        "/debug/memory",
        response_model=dict[str, Any],
        responses={409: {"model": Message, "description": "tracemalloc is off"}},
    )
    async def memory(limit: int = Query(10, ge=1, le=100)) -> JSONResponse:
        """tracemalloc's largest allocation sites; 409 unless the gateway runs with
        GATEWAY_TRACEMALLOC=1."""
        # In a thread: grouping a snapshot's traces takes a second or so of Python, which on
        # the event loop would hold every request in flight past its deadline.
        report = await asyncio.to_thread(memory_report, limit)
        if report is None:
            return JSONResponse(
                {"error": "tracemalloc is off: start the gateway with GATEWAY_TRACEMALLOC=1"},
                status_code=409,
            )
        return JSONResponse(report)

    @api.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The operator's dashboard page (it polls /admin/sources)."""
        return HTMLResponse(DASHBOARD, headers={"cache-control": "no-store"})

    @api.post(
        "/cache/purge",
        response_model=Purged,
        responses={503: {"model": Failure, "description": "the cache backend is down"}},
    )
    async def purge(body: PurgeRequest) -> JSONResponse:
        """Remove cached answers by key or by tag; returns how many keys were removed."""
        try:
            removed = await gw.current().cache.purge(keys=body.keys, tags=body.tags)
        except CacheUnavailable as exc:
            return JSONResponse({"error": "cache unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"removed": removed})

    return api


def changes(old: Runtime, new: Runtime) -> dict[str, list[str]]:
    """Return which sources a reload kept (same pool), opened, and will close after the grace."""
    kept = [n for n, u in new.upstreams.items() if old.upstreams.get(n) is u]
    opened = [n for n in new.upstreams if n not in kept]
    kept_ids = {id(u) for u in new.upstreams.values()}
    closing = [n for n, u in old.upstreams.items() if id(u) not in kept_ids]
    return {"kept": kept, "opened": opened, "closing": closing}


def sources_report(rt: Runtime, lag: LoopLag | None = None) -> dict[str, Any]:
    """Return every source's window statistics (its most frequent failure reasons included) with
    its kind, breaker state and pool usage, and the process's own: asyncio tasks, RSS, the event
    loop's lag and the cache's connections."""
    live: dict[str, dict[str, float]] = {}
    for metric, source, value in live_samples(rt):
        live.setdefault(source, {})[metric.removeprefix("gateway_")] = value
    report = {}
    for name, cfg in rt.loaded.config.sources.items():
        stats = rt.stats.sources.get(name)
        guarded = rt.guards[name]
        values = live.get(name, {})
        report[name] = {
            "kind": cfg.kind,
            **(stats.snapshot() if stats is not None else {}),
            "breaker": guarded.breaker.state if guarded.breaker is not None else None,
            "pool": {
                "size": values.get("pool_size"),
                "in_use": values.get("pool_in_use"),
                "max": values.get("pool_max"),
            },
        }
    return {
        "window_s": rt.stats.window_s,
        "time": time.time(),
        "sources": report,
        "cache": rt.stats.cache.snapshot(),
        "process": {**process_report(lag), "cache_pool": _cache_pool(rt)},
    }


MERGED = (
    "counts are summed over the workers; percentiles come from their latency histograms "
    "merged (exact to one 5 % bin, as in one worker); breaker: the most open worker's (each "
    "worker's in `breakers`); pool: summed; `process` is the answering worker's. Other workers' "
    "figures are as of their last snapshot (`age_s`, written every second)."
)
"""How `/admin/sources` merges workers, said in its answer."""


def worker_snapshot(rt: Runtime, lag: LoopLag | None, generation: int | None) -> dict[str, Any]:
    """Return what one worker shares with its siblings every second: its raw window counts,
    each source's breaker and pool, its process report and the config generation it runs."""
    live: dict[str, dict[str, float]] = {}
    for metric, source, value in live_samples(rt):
        live.setdefault(source, {})[metric.removeprefix("gateway_")] = value
    guards = {
        name: g.breaker.state if g.breaker is not None else None for name, g in rt.guards.items()
    }
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "generation": generation,
        "window": rt.stats.window(),
        "breakers": guards,
        "pools": {
            name: {k: values.get(f"pool_{k}") for k in ("size", "in_use", "max")}
            for name, values in live.items()
        },
        "process": {**process_report(lag), "cache_pool": _cache_pool(rt)},
    }


def merged_report(
    report: dict[str, Any], own: dict[str, Any], siblings: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Return `report` (this worker's `sources_report`) with every source's and the cache's
    statistics merged over this worker's snapshot `own` and its siblings' (see `MERGED`)."""
    everyone = [own, *(siblings[pid] for pid in sorted(siblings))]
    now = time.time()
    for name, source in report["sources"].items():
        if "timeout_ms" not in source:
            continue  # no statistics here (a source that just left): nothing to merge into
        windows = [s["window"]["sources"][name] for s in everyone if name in s["window"]["sources"]]
        breakers = {str(s["pid"]): s["breakers"].get(name) for s in everyone}
        states = [b for b in breakers.values() if b is not None]
        pools = [s["pools"][name] for s in everyone if name in s["pools"]]
        source.update(summary(merge_windows(windows), source["timeout_ms"]))
        source["breaker"] = max(states, key=BREAKER_VALUES.__getitem__) if states else None
        source["breakers"] = breakers
        source["pool"] = {k: _sum(p.get(k) for p in pools) for k in ("size", "in_use", "max")}
    caches = [s["window"]["cache"] for s in everyone]
    report["cache"] = cache_summary({k: sum(c[k] for c in caches) for k in ("lookups", "hits")})
    report["workers"] = {
        "count": len(everyone),
        "merged": MERGED,
        "each": [
            {
                "pid": s["pid"],
                "age_s": round(max(0.0, now - s["time"]), 2),
                "generation": s["generation"],
                "calls": {
                    name: sum(w["outcomes"].values()) for name, w in s["window"]["sources"].items()
                },
                "process": s["process"],
            }
            for s in everyone
        ],
    }
    return report


def _sum(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) if found else None


def _cache_pool(rt: Runtime) -> dict[str, int] | None:
    # Only the Redis store has a connection pool; the in-memory one has nothing to lend.
    stats = getattr(rt.cache.store, "pool_stats", None)
    return stats() if stats is not None else None


DASHBOARD = (resources.files("gateway.ops") / "dashboard.html").read_text(encoding="utf-8")
