"""The application: `create_app(config_path)` builds the gateway's ASGI app (endpoint routes in
plain ASGI around the FastAPI app of everything else) on a swappable runtime."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import multiprocess
from starlette.routing import BaseRoute, Route

from gateway import lifecycle, runtime
from gateway.config import loader as config_mod
from gateway.config.redact import redact_text
from gateway.core.errors import ConfigError, SourceError
from gateway.core.plan import EndpointPlan, build_plans
from gateway.edge.docs import install_docs
from gateway.edge.endpoint import EndpointHandler
from gateway.edge.openapi import (
    endpoint_paths,
    endpoint_schemas,
    validation_schemas,
    with_request_ids,
)
from gateway.edge.routing import Edge
from gateway.ops import admin, log
from gateway.ops.diagnostics import LoopLag, start_tracing_from_env
from gateway.ops.metrics import (
    Metrics,
    multiprocess_dir,
    process_families,
    request_observer,
    sample_forever,
)
from gateway.ops.metrics import endpoint as metrics_endpoint
from gateway.ops.readiness import Health, NotReady, Readiness, Ready
from gateway.ops.stats import Stats
from gateway.ops.token import token_from_env
from gateway.workers import (
    Ack,
    Everywhere,
    WorkerDir,
    WorkersCollector,
    follow,
    reload_everywhere,
    share_snapshots,
)

_log = structlog.get_logger("gateway.app")


class Gateway:
    """The running gateway: its current runtime, replaced as a whole by a reload."""

    def __init__(self, loaded: config_mod.LoadedConfig, workers: WorkerDir | None = None) -> None:
        self.loaded = loaded
        self.workers = workers
        """The directory shared with sibling workers (`gateway serve --workers N`), or None."""
        self.plans: tuple[EndpointPlan, ...] = build_plans(loaded.config)
        self._runtime: runtime.Runtime | None = None
        self._reload_lock = asyncio.Lock()
        self._routes: list[BaseRoute] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self.app: FastAPI | None = None
        self.metrics = Metrics(lambda: self._runtime)
        self.stats = Stats()
        self.lag = LoopLag(on_lag=self.metrics.loop_lag, warn_every_s=10.0, stall_ms=100.0)
        # Set once SIGTERM arrives: /readyz answers 503 from then on while requests drain.
        self.draining = False
        # uvicorn read `server:` when the process started: a reload cannot change it.
        self.server = loaded.config.server

    def current(self) -> runtime.Runtime:
        """Return the runtime requests start on now."""
        if self._runtime is None:
            raise RuntimeError("the gateway has not started (lifespan not run)")
        return self._runtime

    def routes(self) -> list[BaseRoute]:
        """Return one route per endpoint of the current plans."""
        return [
            Route(p.route_path, EndpointHandler(self.current, p.id), methods=["GET"], name=p.id)
            for p in self.plans
        ]

    def endpoint_routes(self) -> list[BaseRoute]:
        """Return the endpoint routes now installed (replaced as a whole by a reload)."""
        return self._routes

    def install_routes(self, app: FastAPI) -> None:
        """Put the endpoint routes of the current plans in `app`, replacing the previous ones."""
        new = self.routes()
        kept = [r for r in app.router.routes if r not in self._routes]
        app.router.routes[:] = [*kept, *new]
        self._routes = new
        app.openapi_schema = None

    async def start(self) -> None:
        """Start sources and cache for the loaded config."""
        self._runtime = await runtime.start(
            self.loaded, metrics=self.metrics, stats=self.stats, plans=self.plans
        )
        freeze_heap()

    async def stop(self) -> None:
        """Close every pool, client and cache connection."""
        for task in list(self._retiring):
            task.cancel()  # a retiring runtime closes at once instead of after its grace
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._runtime is not None:
            await runtime.stop(self._runtime)
            self._runtime = None

    async def reload(self, path: str | None = None) -> runtime.Runtime:
        """Load and validate the config file again (this worker only), then `swap` to it.

        Raises `ConfigError` (and changes nothing) when the file is invalid.
        """
        return await self.swap(config_mod.load(path or self.loaded.file))

    async def swap(self, loaded: config_mod.LoadedConfig) -> runtime.Runtime:
        """Start what changed for an already validated config, then swap to it atomically.

        Raises `SourceError` (and changes nothing) when a new source cannot start.
        """
        async with self._reload_lock:
            old = self.current()
            new = await runtime.start(loaded, previous=old)
            self.loaded, self.plans, self._runtime = loaded, tuple(new.plans.values()), new
            freeze_heap()
            if self.app is not None:
                self.install_routes(self.app)
            _log.info("config_reloaded", file=loaded.file, endpoints=len(self.plans))
            if loaded.config.server != self.server:
                _log.warning(
                    "server_settings_need_restart",
                    running=self.server.model_dump(),
                    file=loaded.config.server.model_dump(),
                )
            # Requests in flight finish on the old runtime: close what it alone owns only after
            # the longest deadline it could still be serving.
            grace = max((p.deadline for p in old.plans.values()), default=1.0) + 1.0
            task = asyncio.create_task(_retire(old, new, grace))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return new

    async def reload_all(
        self, *, only_if_changed: bool = False
    ) -> tuple[runtime.Runtime, Everywhere] | None:
        """Reload the config file in every worker (this one alone without siblings); return the
        new runtime here and every worker's answer, or None when workers share a directory,
        `only_if_changed` is set and they run the file's text already (a sibling's watcher was
        first).

        Raises `ConfigError` or `SourceError` (and no worker changes) when this one cannot.
        """
        if self.workers is not None:
            return await reload_everywhere(self, self.workers, only_if_changed=only_if_changed)
        new = await self.reload()
        return new, Everywhere(None, (Ack(os.getpid(), "reloaded"),))

    async def reload_logged(self, *, only_if_changed: bool = False) -> None:
        """Reload every worker, logging (not raising) a refused file: for SIGHUP and the file
        watcher."""
        try:
            done = await self.reload_all(only_if_changed=only_if_changed)
        except ConfigError as exc:
            _log.warning("config_reload_refused", problems=[str(p) for p in exc.problems])
        except SourceError as exc:
            error = redact_text(str(exc), self.loaded.secrets)
            _log.warning("config_reload_failed", error=error)
        else:
            if done is not None and self.workers is not None:
                _, everywhere = done
                level = _log.warning if everywhere.failed else _log.info
                level("config_reloaded_everywhere", **everywhere.report())


async def _retire(old: runtime.Runtime, new: runtime.Runtime, grace: float) -> None:
    """Close what `old` alone owns once `grace` has passed (or at once when cancelled)."""
    try:
        await asyncio.sleep(grace)
    finally:
        await runtime.stop(old, new)


def create_app(
    config_path: str | None = None,
    *,
    loaded: config_mod.LoadedConfig | None = None,
    watch: bool = False,
    workers: WorkerDir | None = None,
) -> Edge:
    """Return the gateway app for a config file (or an already loaded config); `watch` reloads
    it whenever the file changes; `workers` is the directory shared with sibling workers."""
    if loaded is None:
        if config_path is None:
            raise ValueError("create_app needs a config path or a loaded config")
        loaded = config_mod.load(config_path)
    log.configure()
    gw = Gateway(loaded, workers)
    readiness = Readiness()

    def snapshot() -> dict[str, Any]:
        """This worker's statistics, for its siblings' answers."""
        generation = workers.applied if workers is not None else None
        return admin.worker_snapshot(gw.current(), gw.lag, generation)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start_tracing_from_env()  # GATEWAY_TRACEMALLOC=1: for /admin/debug/memory
        await gw.start()
        gw.lag.start()
        background = []
        if watch:
            background.append(asyncio.create_task(lifecycle.watch(gw)))
        if multiprocess_dir() is not None:
            background.append(asyncio.create_task(sample_forever(gw.metrics)))
        if workers is not None:
            background.append(asyncio.create_task(follow(gw, workers)))
            background.append(
                asyncio.create_task(
                    share_snapshots(workers, snapshot, lambda: {"metrics": process_families()})
                )
            )
        hup = lifecycle.on_sighup(gw)
        term = lifecycle.on_sigterm(gw)
        try:
            yield
        finally:
            term()
            hup()
            await readiness.close()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if workers is not None:
                workers.leave()
            await gw.lag.stop()
            await gw.stop()
            if multiprocess_dir() is not None:
                multiprocess.mark_process_dead(os.getpid())
            await asyncio.to_thread(log.flush)  # the last lines, before the process may exit

    app = FastAPI(
        title="Aggregation gateway",
        version="0.1.0",
        lifespan=lifespan,
        # Starlette's slash redirect names the host the request claimed (`Host: evil.example`):
        # `/healthz/` is a 404, like any path that is not a route.
        redirect_slashes=False,
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN; ours serve them offline.
        docs_url=None,
        redoc_url=None,
        **_no_framework_telemetry(),
    )
    install_docs(app)
    app.state.gateway = gw
    gw.app = app
    if workers is not None:
        gw.metrics.workers = WorkersCollector(workers)
    app.add_api_route(
        "/metrics",
        metrics_endpoint(gw.metrics),
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "The Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    token = token_from_env()
    if token is not None:
        app.include_router(admin.router(gw, token))

    @app.get("/healthz", tags=["operations"], response_model=Health)
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    no_store = {
        "Cache-Control": {"schema": {"type": "string", "enum": ["no-store"]}, "required": True}
    }

    @app.get(
        "/readyz",
        tags=["operations"],
        responses={
            200: {"model": Ready, "headers": no_store},
            503: {
                "model": NotReady,
                "description": "this instance is starting or draining",
                "headers": no_store,
            },
        },
    )
    async def readyz() -> JSONResponse:
        """200 while this instance can serve, with each source's and the cache's last known
        state ("up", "down" with a reason, "unknown"); 503 only while starting or draining."""
        status, body = await readiness.answer(gw)
        return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})

    gw.install_routes(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                routes=app.routes,
                description="Aggregated endpoints from gateway.yaml.",
            )
            schema.setdefault("paths", {}).update(endpoint_paths(gw.plans, token is not None))
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                {**validation_schemas(), **endpoint_schemas(gw.plans)}
            )
            app.openapi_schema = with_request_ids(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return Edge(
        app,
        gw.endpoint_routes,
        request_observer(gw.metrics),
        max_header_bytes=loaded.config.server.max_header_bytes,
    )


def freeze_heap() -> None:
    """Move everything startup built out of the cycle collector's sight.

    A full collection walks every tracked object: with the framework, pydantic and prometheus
    loaded that took 55-67 ms here, long enough to push requests in flight past their deadline
    (bench faults scenario); frozen, the same collections take about 5 ms.
    """
    gc.collect()
    gc.freeze()


def _no_framework_telemetry() -> dict[str, Any]:
    """Return FastAPI's switch for its own OpenTelemetry hooks, off, where it has them.

    Since 0.16x FastAPI checks its telemetry settings (reading the environment) on every request;
    our metrics are Prometheus, and the check costs more than a cache hit's own work.
    """
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def app_from_env() -> Edge:
    """Return the app for `$GATEWAY_CONFIG` (the factory `gateway serve` gives uvicorn);
    `GATEWAY_WATCH=1` reloads it whenever the file changes. A worker of `--workers N` starts on
    the latest config generation its siblings run (`GATEWAY_WORKERS_DIR`), not on the file."""
    workers = WorkerDir.from_env()
    return create_app(
        os.environ.get("GATEWAY_CONFIG", "gateway.yaml"),
        loaded=workers.starting() if workers is not None else None,
        watch=os.environ.get("GATEWAY_WATCH") == "1",
        workers=workers,
    )
