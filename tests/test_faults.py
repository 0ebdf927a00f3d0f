"""Fault injection: scripted upstream faults against each policy, through the composed guard().

Every case builds a real `HttpSourceConfig` (or `SqlSourceConfig`), starts the real adapter and
wraps it with `gateway.core.plan.guard()`, so the policies run in the order the gateway uses. Each
case asserts the outcome, an upper bound on latency (the call's budget plus generous slack) and
how many requests the upstream itself received.

DNS failure is not here: a name that resolves nowhere (`nonexistent.invalid`) is still sent to
the system resolver, which may ask a DNS server off this machine, and these tests only talk to
127.0.0.1. aiohttp raises `ClientConnectorDNSError`, a `ClientConnectorError`, for it, which
`upstreams.http.map_errors` turns into a connect failure like a refused connection (below).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pymysql
import pytest
from aiohttp import web

from gateway.config.kinds import HttpSourceConfig, SqlSourceConfig
from gateway.core.errors import SourceError
from gateway.core.plan import Guarded, guard, open_upstream
from gateway.core.types import JSON, Call, Upstream
from gateway.demo.simulator import (
    Handler,
    UpstreamServer,
    chunked,
    hang,
    json_body,
    raw,
    reset_mid_body,
    slow,
    truncated,
)
from tests.support import MariaDB, free_port

TIMEOUT_S = 0.25  # every source's timeout_ms here; a stalled machine must not cut a request
DEADLINE_S = 1.0  # each call's deadline: long enough that only the policies decide
SLACK_S = 0.3  # generous: the machine is shared and the upstream runs in the same loop
AT_ONCE_S = 0.1  # "failed at once": well under one timeout, with room for a busy machine
MAX_BYTES = 4096
HEDGE_AFTER_S = 0.03
# A late answer: after the hedge is sent, with time for the hedge to reach the upstream before
# the first answer makes it lose (and be cancelled), so the upstream's count is exact.
LATE_S = 0.15
BACKOFF_S = 0.005

# --- the upstream's scripted faults ---------------------------------------------------------


def in_turn(*handlers: Handler) -> Handler:
    """Answer the n-th request like the n-th handler, and every later one like the last."""
    served = 0

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal served
        served += 1
        return await handlers[min(served, len(handlers)) - 1](request)

    return handle


def drip() -> Handler:
    """Send a JSON body one byte per 100 ms: the body never ends within a call's timeout."""
    return chunked([bytes([b]) for b in b'{"slowly": "dripping"}'], pause_s=0.1)


FAULTS: dict[str, Callable[[], Handler]] = {
    "hang": hang,
    "delay": lambda: slow(LATE_S, json_body({"late": True})),  # late, but within the timeout
    "status_503": lambda: json_body({"error": "unavailable"}, status=503),
    "status_404": lambda: json_body({"error": "not found"}, status=404),
    "reset": reset_mid_body,  # headers and part of the body, then RST (after 50 ms)
    "truncated": truncated,  # Content-Length 1000, a few bytes, then FIN (after 50 ms)
    "garbage": lambda: raw(b"<html>502 Bad Gateway</html>"),
    "drip": drip,
    "huge": lambda: chunked([b"[" + b"0," * MAX_BYTES + b"0]"]),  # chunked, over max_bytes
    "refused": hang,  # never reached: the source points at a port nothing listens on
}

# How each policy is configured on the faulty source (all with timeout_ms 250).
POLICIES: dict[str, dict[str, Any]] = {
    "timeout": {},
    "retry": {"retry": {"attempts": 2, "backoff_ms": 5, "jitter": False}},
    "breaker": {"breaker": {"failure_ratio": 0.5, "min_calls": 3, "open_ms": 60_000}},
    "bulkhead": {"max_in_flight": 2},
    "hedge": {"hedge": {"after_ms": 30}},
}

# What the adapter is asked for under each policy: timeout, retry and hedge make one call,
# the breaker five in a row (min_calls 3), the bulkhead four at once (max_in_flight 2).
BREAKER_CALLS, BULKHEAD_CALLS = 5, 4

# fault: (outcome, attempts reaching the adapter under timeout, retry, breaker, bulkhead, hedge).
# The upstream counts the same requests, except for `refused`, which it never sees.
# retry: default `on` is timeout, connect, 502, 503, 504. breaker: opens after 3 failures
# (timeout, error); not_found and ok are successes. hedge: sent when the first attempt has not
# ended after 30 ms (hang, drip, the 150 ms delay, and reset/truncated, which end after 50 ms).
EXPECTED: dict[str, tuple[str, int, int, int, int, int]] = {
    "hang": ("timeout", 1, 2, 3, 2, 2),
    "delay": ("ok", 1, 1, 5, 2, 2),
    "status_503": ("error", 1, 2, 3, 2, 1),
    "status_404": ("not_found", 1, 1, 5, 2, 1),
    "reset": ("error", 1, 1, 3, 2, 2),
    "truncated": ("error", 1, 1, 3, 2, 2),
    "garbage": ("error", 1, 1, 3, 2, 1),
    "drip": ("timeout", 1, 2, 3, 2, 2),
    "huge": ("error", 1, 1, 3, 2, 1),
    "refused": ("error", 1, 2, 3, 2, 1),
}

# The longest one call may take under each policy: one timeout, two (plus backoff), or the
# hedge's delay plus the hedge's own timeout.
BUDGET_S = {
    "timeout": TIMEOUT_S,
    "retry": 2 * TIMEOUT_S + BACKOFF_S,
    "breaker": TIMEOUT_S,
    "bulkhead": TIMEOUT_S,
    "hedge": HEDGE_AFTER_S + TIMEOUT_S,
}


# --- running calls through guard() ----------------------------------------------------------


@dataclass
class Faulty:
    """A guarded HTTP source, the upstream behind it, and the attempts its adapter received."""

    server: UpstreamServer
    guarded: Guarded
    attempts: list[str]

    def call(self, timeout: float = TIMEOUT_S, deadline: float = DEADLINE_S) -> Call:
        loop = asyncio.get_running_loop()
        return Call("faulty", "c", "/f/1", {}, timeout, loop.time() + deadline)

    async def run(self, call: Call | None = None) -> tuple[str, float]:
        """Return one call's outcome and how long it took; a non-SourceError fails the test."""
        start = time.monotonic()
        try:
            await self.guarded.call(call or self.call())
        except SourceError as exc:
            return exc.outcome, time.monotonic() - start
        return "ok", time.monotonic() - start


@asynccontextmanager
async def faulty(
    handler: Handler, *, refused: bool = False, **policy: Any
) -> AsyncIterator[Faulty]:
    """Serve `handler` on /f/ and yield a guarded source for it, configured with `policy`."""
    async with UpstreamServer() as server:
        server.route("/f/", handler)
        base = f"http://127.0.0.1:{free_port()}" if refused else server.url
        fields = {"timeout_ms": int(TIMEOUT_S * 1000), "max_bytes": MAX_BYTES, **policy}
        cfg = HttpSourceConfig.model_validate({"kind": "http", "base_url": base, **fields})
        upstream = await open_upstream("faulty", cfg)
        attempts: list[str] = []
        upstream.call = _counting(upstream.call, attempts)
        try:
            yield Faulty(server, guard("faulty", cfg, upstream), attempts)
        finally:
            await upstream.close()


def _counting(call: Callable[[Call], Awaitable[JSON]], into: list[str]) -> Any:
    async def counted(c: Call) -> JSON:
        into.append(c.target)
        return await call(c)

    return counted


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault_against_policy(fault: str, policy: str) -> None:
    outcome, *per_policy = EXPECTED[fault]
    attempts = per_policy[list(POLICIES).index(policy)]
    budget = BUDGET_S[policy]
    async with faulty(FAULTS[fault](), refused=fault == "refused", **POLICIES[policy]) as f:
        start = time.monotonic()
        if policy == "breaker":
            results = [await f.run() for _ in range(BREAKER_CALLS)]
            opened = outcome in ("timeout", "error")
            expected = [outcome] * (3 if opened else BREAKER_CALLS)
            expected += ["circuit_open"] * (BREAKER_CALLS - len(expected))
            # The calls that found the breaker open failed at once: nothing queued or waited.
            assert all(t < AT_ONCE_S for o, t in results if o == "circuit_open"), results
        elif policy == "bulkhead":
            results = await asyncio.gather(*(f.run() for _ in range(BULKHEAD_CALLS)))
            expected = [outcome] * 2 + ["overloaded"] * (BULKHEAD_CALLS - 2)
            assert all(t < AT_ONCE_S for o, t in results if o == "overloaded"), results
        else:
            results = [await f.run()]
            expected = [outcome]
        elapsed = time.monotonic() - start
        assert [o for o, _ in results] == expected
        assert all(t < budget + SLACK_S for _, t in results), results
        calls_in_a_row = BREAKER_CALLS if policy == "breaker" else 1
        assert elapsed < calls_in_a_row * budget + SLACK_S, results
        assert len(f.attempts) == attempts
        seen = len(f.server.seen)
        assert seen == (0 if fault == "refused" else attempts)
        # Nothing is left running that could still reach the upstream after the call returned.
        await asyncio.sleep(0.05)
        assert len(f.server.seen) == seen


# --- rescues, budgets and the order of policies ---------------------------------------------


async def test_retry_rescues_a_call_whose_first_attempt_hangs() -> None:
    async with faulty(in_turn(hang(), json_body({"n": 2})), **POLICIES["retry"]) as f:
        outcome, took = await f.run()
    assert outcome == "ok" and len(f.server.seen) == 2
    assert took < BUDGET_S["retry"] + SLACK_S


async def test_hedge_rescues_a_hanging_first_request_long_before_its_timeout() -> None:
    async with faulty(in_turn(hang(), json_body({"n": 2})), hedge={"after_ms": 30}) as f:
        outcome, took = await f.run(f.call(timeout=1.0, deadline=2.0))
    assert outcome == "ok" and len(f.server.seen) == 2
    assert f.guarded.hedge is not None and (f.guarded.hedge.sent, f.guarded.hedge.won) == (1, 1)
    assert took < 0.8  # the first request alone would have taken its whole 1 s timeout


async def test_hedge_after_p95_waits_for_samples_then_follows_the_live_latency() -> None:
    fast = json_body({"fast": True})
    handler = in_turn(*[fast] * 20, hang(), fast)
    async with faulty(handler, timeout_ms=1000, hedge={"after": "p95"}) as f:
        assert f.guarded.latency is not None and f.guarded.hedge is not None
        for _ in range(20):  # too few samples yet: no hedge, whatever the latency
            assert (await f.run(f.call(timeout=1.0)))[0] == "ok"
        assert f.guarded.hedge.sent == 0
        p95 = f.guarded.latency.quantile(0.95)
        assert p95 is not None and p95 < 0.4
        outcome, took = await f.run(f.call(timeout=1.0, deadline=2.0))  # its first request hangs
    assert outcome == "ok" and f.guarded.hedge.sent == 1
    assert took < 0.8 and len(f.server.seen) == 22  # not the hanging request's 1 s timeout


async def test_hedges_and_retries_share_one_budget_per_source() -> None:
    # Budget: at least 3 per window, else 20 % of calls. Three late answers spend it on hedges,
    # so the 503s that follow are not retried, though retry is configured for them.
    handler = in_turn(*[slow(LATE_S, json_body({}))] * 6, json_body({}, status=503))
    policy: dict[str, Any] = {"retry": {"attempts": 2, "backoff_ms": 0}, "hedge": {"after_ms": 30}}
    async with faulty(handler, **policy) as f:
        assert f.guarded.hedge is not None and f.guarded.retry is not None
        for _ in range(3):
            assert (await f.run())[0] == "ok"
        assert (f.guarded.hedge.sent, len(f.server.seen)) == (3, 6)
        for _ in range(3):
            assert (await f.run())[0] == "error"
        assert f.guarded.retry.retries == 0 and f.guarded.retry.refused_budget == 3
        assert len(f.server.seen) == 9


async def test_hedged_source_without_retry_config_counts_its_calls_for_the_budget() -> None:
    async with faulty(slow(LATE_S, json_body({})), hedge={"after_ms": 30}) as f:
        assert f.guarded.retry is not None  # one attempt only: there to count calls
        for _ in range(5):
            assert (await f.run())[0] == "ok"
        assert f.guarded.retry.attempts == 5 and f.guarded.retry.retries == 0
        assert f.guarded.hedge is not None and f.guarded.hedge.sent == 3
        assert len(f.server.seen) == 8


async def test_open_breaker_never_retries_hedges_or_takes_a_bulkhead_slot() -> None:
    policy = {
        **POLICIES["breaker"],
        **POLICIES["retry"],
        "hedge": {"after_ms": 30},
        "max_in_flight": 1,
    }
    async with faulty(json_body({}, status=503), **policy) as f:
        for _ in range(3):
            assert (await f.run())[0] == "error"
        seen = len(f.server.seen)
        assert f.guarded.breaker is not None and f.guarded.breaker.state == "open"
        results = await asyncio.gather(*(f.run() for _ in range(10)))
    assert [o for o, _ in results] == ["circuit_open"] * 10
    assert all(t < AT_ONCE_S for _, t in results), results
    assert len(f.server.seen) == seen
    assert f.guarded.limit is not None and f.guarded.limit.rejected == 0


async def test_timeout_covers_the_wait_for_a_pooled_connection() -> None:
    # One connection in the pool, held by a hanging request: the next call waits for it, and
    # that wait is part of its own timeout.
    async with faulty(in_turn(hang(), json_body({})), pool={"max": 1}) as f:
        holder = asyncio.ensure_future(f.run(f.call(timeout=0.5)))
        await f.server.wait_seen(1)
        outcome, took = await f.run()
        assert outcome == "timeout" and took < TIMEOUT_S + SLACK_S
        assert len(f.server.seen) == 1  # it never got a connection to send on
        assert (await holder)[0] == "timeout"


async def test_requests_carry_the_request_id_and_remaining_budget() -> None:
    async with faulty(json_body({})) as f:
        loop = asyncio.get_running_loop()
        call = Call("faulty", "c", "/f/1", {}, TIMEOUT_S, loop.time() + 0.25, request_id="r-1")
        assert (await f.run(call))[0] == "ok"
    headers = f.server.seen[0].headers
    assert headers["X-Request-ID"] == "r-1"
    assert 150 <= int(headers["X-Request-Deadline-Ms"]) <= 250


# --- SQL: the server-side limit, pool exhaustion, MariaDB restarting ------------------------


@asynccontextmanager
async def sql_guarded(dsn: str, **fields: Any) -> AsyncIterator[tuple[Guarded, Upstream]]:
    """Yield a guarded SQL source for `dsn`, with `fields` as its config."""
    cfg = SqlSourceConfig.model_validate({"kind": "sql", "dsn": dsn, **fields})
    upstream = await open_upstream("db", cfg)
    try:
        yield guard("db", cfg, upstream), upstream
    finally:
        await upstream.close()


def sql_call(sql: str, timeout: float, params: dict[str, Any] | None = None) -> Call:
    loop = asyncio.get_running_loop()
    return Call("db", "q", sql, params or {}, timeout, loop.time() + DEADLINE_S, one=False)


async def outcome_of(source: Guarded, call: Call) -> tuple[str, float]:
    start = time.monotonic()
    try:
        await source.call(call)
    except SourceError as exc:
        return exc.outcome, time.monotonic() - start
    return "ok", time.monotonic() - start


def running(url: str, marker: str) -> int:
    """Return how many statements containing `marker` the server is running now."""
    dsn = urlsplit(url)
    conn = pymysql.connect(host=dsn.hostname, port=dsn.port or 3306, user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE INFO LIKE %s AND INFO NOT LIKE %s",
                (f"%{marker}%", "%PROCESSLIST%"),
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


async def test_sql_query_is_stopped_by_the_server_at_its_budget(mysql_url: str) -> None:
    marker = f"fault_{uuid.uuid4().hex[:8]}"
    async with sql_guarded(mysql_url, timeout_ms=200) as (db, _):
        start = time.monotonic()
        outcome, took = await outcome_of(db, sql_call(f"SELECT SLEEP(3) AS {marker}", 0.2))
        assert outcome == "timeout" and took < 0.2 + SLACK_S
        # The client gave up at 200 ms; the server stopped it too (max_statement_time), instead
        # of sleeping on for 3 s on a connection nobody reads.
        for _ in range(20):
            if await asyncio.to_thread(running, mysql_url, marker) == 0:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(running, mysql_url, marker) == 0
        assert time.monotonic() - start < 1.5


async def test_sql_pool_exhaustion_counts_against_the_timeout(mysql_url: str) -> None:
    async with sql_guarded(mysql_url, timeout_ms=150, pool={"min": 1, "max": 1}) as (db, up):
        holder = asyncio.ensure_future(outcome_of(db, sql_call("SELECT SLEEP(0.5) AS s", 1.0)))
        await asyncio.sleep(0.05)
        outcome, took = await outcome_of(db, sql_call("SELECT 1 AS one", 0.15))
        assert outcome == "timeout" and took < 0.15 + SLACK_S  # not 0.5 s behind the holder
        assert (await holder)[0] == "ok"
        assert (await outcome_of(db, sql_call("SELECT 2 AS two", 0.15)))[0] == "ok"
        assert up.pool_stats()["in_use"] == 0


async def test_sql_bulkhead_fails_fast_instead_of_queueing_for_the_pool(mysql_url: str) -> None:
    fields = {"timeout_ms": 600, "max_in_flight": 1, "pool": {"min": 1, "max": 1}}
    async with sql_guarded(mysql_url, **fields) as (db, _):
        holder = asyncio.ensure_future(outcome_of(db, sql_call("SELECT SLEEP(0.3) AS s", 0.6)))
        await asyncio.sleep(0.05)
        outcome, took = await outcome_of(db, sql_call("SELECT 1 AS one", 0.6))
        assert outcome == "overloaded" and took < AT_ONCE_S
        assert (await holder)[0] == "ok"


# MariaDB restarting mid-load needs a server this test may kill: a throwaway mariadbd from the
# installed binaries, on a spare port, in its own data directory (never the shared one).


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    """A fresh MariaDB on a spare port with a tiny seeded table (about 5 s: the install), the
    reliability harness's too (tests/support.py)."""
    server = MariaDB(tmp_path_factory.mktemp("mariadb"), free_port())
    try:
        server.install()
        conn = pymysql.connect(
            unix_socket=f"{server.workdir}/mysqld.sock", user="root", autocommit=True
        )
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE faults")
            cur.execute("CREATE TABLE faults.items (id INT PRIMARY KEY, name VARCHAR(20))")
            cur.executemany(
                "INSERT INTO faults.items VALUES (%s, %s)", [(i, f"item-{i}") for i in range(1, 9)]
            )
        conn.close()
        yield server
    finally:
        server.crash()


async def test_mariadb_restarting_mid_load(throwaway: MariaDB) -> None:
    budget = 0.2
    by_id = "SELECT id, name FROM items WHERE id = %(id)s"
    fields = {"timeout_ms": int(budget * 1000), "pool": {"min": 2, "max": 4}}
    log: list[tuple[str, float, float]] = []  # (outcome, started at, took)
    stop = asyncio.Event()

    async def worker(db: Guarded, n: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(2000):  # bounded; `stop` ends it much sooner
            if stop.is_set():
                return
            call = Call("db", "q", by_id, {"id": i % 8 + 1}, budget, loop.time() + 1.0, one=True)
            started = time.monotonic()
            try:
                row = await db.call(call)
                assert row == {"id": i % 8 + 1, "name": f"item-{i % 8 + 1}"}  # never another's
                outcome = "ok"
            except SourceError as exc:
                outcome = exc.outcome
            log.append((outcome, started, time.monotonic() - started))
            await asyncio.sleep(0.01)

    def since(t: float) -> list[str]:
        return [o for o, started, _ in log if started >= t]

    async with sql_guarded(throwaway.dsn("faults"), **fields) as (db, upstream):
        workers = [asyncio.ensure_future(worker(db, n)) for n in range(4)]
        try:
            await asyncio.sleep(0.4)
            assert set(since(0)) == {"ok"}, log
            killed = time.monotonic()
            throwaway.crash()
            await asyncio.sleep(0.5)
            # While it is down, every call fails (refused: error; or timeout) and fails in time.
            down = since(killed + 0.05)
            assert down and set(down) <= {"error", "timeout"}, down
            restarted = time.monotonic()
            await asyncio.to_thread(throwaway.start)
            for _ in range(100):  # up to 10 s for the pool to get answers again
                back = since(time.monotonic() - 0.2)
                if back and set(back) == {"ok"}:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
            healed = since(time.monotonic() - 0.3)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert healed and set(healed) == {"ok"}, log[-20:]
        assert all(took < budget + SLACK_S for _, _, took in log), max(t for *_, t in log)
        assert upstream.pool_stats()["in_use"] == 0 and upstream.pool_stats()["size"] <= 4
    counts = {o: sum(1 for x, *_ in log if x == o) for o in ("ok", "error", "timeout")}
    print(f"restart mid-load: {counts}, down for {restarted - killed:.2f} s")
