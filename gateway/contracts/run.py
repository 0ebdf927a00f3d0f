"""Running contracts: each case against a fresh gateway (the real app, its own memory cache,
breakers and pools) served on loopback, its upstreams scripted, with real timers."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import aiohttp
import orjson
import uvicorn
from multidict import CIMultiDict
from starlette.types import ASGIApp

from gateway import runtime
from gateway.app import create_app
from gateway.config.kinds import HttpSourceConfig
from gateway.config.loader import LoadedConfig
from gateway.contracts.compare import ABSENT, first_difference, show
from gateway.contracts.model import Case, Contract, Script
from gateway.contracts.scripted import Played, http_handler, opener
from gateway.demo.simulator import UpstreamServer
from gateway.edge.server import http_protocol

ANSWER_WAIT_S = 30.0
"""How long a case waits for the gateway's answer before it fails."""
BODY_SHOWN = 2000
"""How much of the answer a failure text shows."""


@dataclass(frozen=True, slots=True)
class Result:
    """One case's outcome: its failures (none: it passed) and how long the request took."""

    file: str
    endpoint: str
    case: str
    seconds: float
    failures: tuple[str, ...]
    body: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures

    def text(self) -> str:
        """Return the failure text: each failed check, then the answer, truncated."""
        lines = list(self.failures)
        if self.body:
            lines.append(f"answer: {self.body}")
        return "\n".join(lines)


async def run_contracts(
    loaded: LoadedConfig, contracts: list[Contract], report: Callable[[Result], None]
) -> list[Result]:
    """Run every case of `contracts` in order, calling `report` as each one ends."""
    results = []
    for contract in contracts:
        for case in contract.cases:
            result = await run_case(loaded, contract, case)
            report(result)
            results.append(result)
    return results


@dataclass(frozen=True, slots=True)
class Answer:
    """The gateway's answer to a case's request, read whole."""

    status: int
    headers: CIMultiDict[str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


async def run_case(loaded: LoadedConfig, contract: Contract, case: Case) -> Result:
    """Run one case on a gateway of its own and return what it found."""
    played = {name: Played(script) for name, script in case.scripts.items()}
    for name, source in loaded.config.sources.items():
        if name not in played:  # a source this endpoint does not use: never asked
            kind: Literal["http", "sql"] = "http" if isinstance(source, HttpSourceConfig) else "sql"
            played[name] = Played(Script(name, kind, (), repeat=False))
    failures: list[str] = []
    response: Answer | None = None
    elapsed = 0.0
    async with AsyncExitStack() as stack:
        urls = {}
        for name, source in loaded.config.sources.items():
            if isinstance(source, HttpSourceConfig):
                server = UpstreamServer(cancel_on_disconnect=True)
                server.route("/", http_handler(played[name]))
                await stack.enter_async_context(server)
                urls[name] = server.url
        token = runtime.opening.set(opener(played))
        try:
            app = create_app(loaded=_pointed(loaded, urls))
            # The client first: made while the gateway serves, its set-up would stall the loop
            # the gateway's timers run on.
            client = await stack.enter_async_context(
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=ANSWER_WAIT_S), trust_env=False
                )
            )
            async with serving(app) as base:
                started = time.perf_counter()
                try:
                    async with client.get(
                        base + case.request.path, headers=case.request.headers
                    ) as answer:
                        response = Answer(
                            answer.status, CIMultiDict(answer.headers), await answer.read()
                        )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures.append(f"no answer: {type(exc).__name__}: {exc}")
                elapsed = time.perf_counter() - started
        except (RuntimeError, ValueError) as exc:  # this case fails; the others still run
            failures.append(f"the gateway did not start: {exc}")
        finally:
            runtime.opening.reset(token)
    # Read after the servers closed: every request the gateway sent is in.
    body = ""
    if response is not None:
        body = response.text
        failures.extend(_checked(case, response, elapsed))
    for p in played.values():
        failures.extend(p.problems())
    if len(body) > BODY_SHOWN:
        body = body[:BODY_SHOWN] + "..."
    return Result(
        contract.file,
        contract.endpoint,
        case.name,
        elapsed,
        tuple(failures),
        body if failures else "",
    )


def _checked(case: Case, response: Answer, elapsed: float) -> list[str]:
    expect = case.expect
    found = []
    if response.status != expect.status:
        found.append(f"status: expected {expect.status}, got {response.status}")
    for name, value in expect.headers.items():
        got = response.headers.get(name)
        if got != value:
            found.append(
                f"header {name}: expected {show(ABSENT if value is None else value)}, "
                f"got {show(ABSENT if got is None else got)}"
            )
    if expect.has_json:
        try:
            doc = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            found.append("json: the answer is not JSON")
        else:
            wanted = orjson.loads(orjson.dumps(expect.json_, default=str))  # YAML dates as text
            diff = first_difference(wanted, doc)
            if diff is not None:
                where, e, g = diff
                found.append(f"{where}: expected {show(e)}, got {show(g)}")
    if expect.within_ms is not None and elapsed * 1000 > expect.within_ms:
        found.append(f"time: expected within {expect.within_ms} ms, took {elapsed * 1000:.0f} ms")
    return found


def _pointed(loaded: LoadedConfig, urls: Mapping[str, str]) -> LoadedConfig:
    """Return the config with its HTTP sources at the case's servers and a memory cache."""
    config = loaded.config
    sources = {
        name: src.model_copy(update={"base_url": urls[name]}) if name in urls else src
        for name, src in config.sources.items()
    }
    cache = config.cache.model_copy(update={"url": "memory://", "near": None})
    return dataclasses.replace(
        loaded, config=config.model_copy(update={"sources": sources, "cache": cache})
    )


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` (lifespan included) on a loopback port of its own; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="error",
            access_log=False,
            lifespan="on",
            http=http_protocol(),
        )
    )
    server.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            if task.done() and task.exception() is not None:
                raise RuntimeError(f"uvicorn did not start: {task.exception()!r}")
            raise RuntimeError("uvicorn did not start within 5 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        finally:
            sock.close()
