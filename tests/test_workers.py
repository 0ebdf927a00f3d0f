"""`gateway serve --workers 2` as one gateway: /admin/reload and SIGHUP to the supervisor reload
every worker in place (the same text everywhere), a bad file is refused by all, /admin/sources
merges every worker's statistics and /metrics reports every worker's process samples.

Workers are told apart by the pid each one's /admin/sources answer carries; a fresh connection
per request lets the kernel hand requests to either worker, so the tests ask until both answered
(a bounded number of times)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.types import Outcome
from gateway.demo.simulator import Simulators
from gateway.ops.metrics import MULTIPROC_ENV, Metrics
from gateway.ops.stats import SourceStats, merge_windows, summary
from gateway.workers import FRESH_S, KEEP_GENERATIONS, Everywhere, WorkerDir
from tests.config_files import (
    config_text,
    gateway_process,
    read,
    server_env,
    with_extra_source,
    write_atomically,
    write_config,
)
from tests.support import free_port

TOKEN = "workers-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ASKS = 200
"""The most requests sent to reach both workers (each on a fresh connection)."""


@asynccontextmanager
async def two_workers(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path, str]]:
    """Run `gateway serve --workers 2` on the shipped config; yield the supervisor process, the
    config file and the base URL once both workers have said they are there."""
    path = write_config(tmp_path, config_text(redis_prefix))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(sims, catalog_dsn, redis_url, admin_token=TOKEN)
    logs = tmp_path / "gateway.log"
    async with gateway_process(path, port, env, logs, "--workers", "2") as proc:
        for _ in range(150):  # each worker shares its snapshot as it starts, then every second
            if (await admin_sources(base))["workers"]["count"] == 2:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"two workers not seen within 15 s: {read(logs)}")
        yield proc, path, base


async def admin_sources(base: str) -> dict[str, Any]:
    """Return one /admin/sources answer, asked on a fresh connection."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/admin/sources", headers=AUTH) as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def each_worker(base: str) -> dict[int, dict[str, Any]]:
    """Return one /admin/sources answer from each of the two workers, by pid."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(ASKS):
        body = await admin_sources(base)
        seen[body["process"]["pid"]] = body
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only worker {list(seen)} answered {ASKS} requests")


async def until_each_worker(base: str, has_extra: bool, within_s: float = 15) -> set[int]:
    """Return the workers' pids once both answer with (or without) the `extra` source."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + within_s
    while loop.time() < ends:
        answers = await each_worker(base)
        if all(("extra" in a["sources"]) is has_extra for a in answers.values()):
            return set(answers)
        await asyncio.sleep(0.1)
    raise AssertionError(f"the workers did not all reach extra={has_extra} in {within_s} s")


async def generations(base: str) -> list[int]:
    """Return the config generation each worker runs, as /admin/sources reports them once the
    answers agree (another worker's figure is as of its last snapshot: up to a second old)."""
    found: list[int] = []
    for _ in range(50):
        found = sorted(w["generation"] for w in (await admin_sources(base))["workers"]["each"])
        if found[0] == found[-1]:
            break
        await asyncio.sleep(0.1)
    return found


def log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    """Return the JSON log lines of the supervisor and its workers."""
    text = read(tmp_path / "gateway.log")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_admin_reload_reloads_every_worker_and_a_bad_file_none(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with two_workers(sims, catalog_dsn, redis_url, redis_prefix, tmp_path) as (
        _,
        path,
        base,
    ):
        before = await until_each_worker(base, has_extra=False)
        write_atomically(path, with_extra_source(config_text(redis_prefix)))
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{base}/admin/reload", headers=AUTH) as resp,
        ):
            assert resp.status == 200
            body = await resp.json()
        assert body["status"] == "reloaded" and body["opened"] == ["extra"]
        workers = body["workers"]
        assert workers["count"] == 2 and workers["reloaded"] == 2 and workers["failed"] == []
        generation = workers["generation"]
        assert generation == 2  # `gateway serve` published the first text as generation 1
        # Answered at once: both workers run it now, in place (the same processes).
        answers = await each_worker(base)
        assert set(answers) == before
        assert all("extra" in a["sources"] for a in answers.values())
        assert await generations(base) == [generation, generation]

        # A bad file: refused by the worker that validates it, seen by no other.
        path.write_text(with_extra_source(config_text(redis_prefix)).replace("max: 20}", "max: x}"))
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{base}/admin/reload", headers=AUTH) as resp,
        ):
            assert resp.status == 400
            refused = await resp.json()
        assert refused["error"] == "invalid config" and "max" in refused["problems"][0]
        await asyncio.sleep(0.5)  # a follower would have seen a generation by now
        answers = await each_worker(base)
        assert set(answers) == before
        assert all("extra" in a["sources"] for a in answers.values())
        assert await generations(base) == [generation, generation]
        async with aiohttp.ClientSession() as http, http.get(f"{base}/products/3") as resp:
            assert resp.status == 200


async def test_sighup_to_the_supervisor_reloads_every_worker_in_place(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with two_workers(sims, catalog_dsn, redis_url, redis_prefix, tmp_path) as (
        proc,
        path,
        base,
    ):
        before = await until_each_worker(base, has_extra=False)
        write_atomically(path, with_extra_source(config_text(redis_prefix)))
        proc.send_signal(signal.SIGHUP)
        # uvicorn's own SIGHUP would have replaced both workers; ours keeps them.
        assert await until_each_worker(base, has_extra=True) == before
        # A bad file: the supervisor refuses it, no worker sees it.
        path.write_text(config_text(redis_prefix).replace("max: 20}", "max: x}"))
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if any(line["event"] == "config_reload_refused" for line in log_lines(tmp_path)):
                break
            await asyncio.sleep(0.1)
        assert await until_each_worker(base, has_extra=True) == before
        async with aiohttp.ClientSession() as http, http.get(f"{base}/products/4") as resp:
            assert resp.status == 200
        assert proc.returncode is None
        for _ in range(100):  # the supervisor logs the workers' answers once they are in
            if any(e["event"] == "config_reloaded_everywhere" for e in log_lines(tmp_path)):
                break
            await asyncio.sleep(0.1)
    lines = log_lines(tmp_path)
    (done,) = [e for e in lines if e["event"] == "config_reloaded_everywhere"]
    assert done["count"] == 2 and done["reloaded"] == 2 and done["failed"] == []
    refused = [e for e in lines if e["event"] == "config_reload_refused"]
    assert len(refused) == 1 and "max" in refused[0]["problems"][0]
    reloaded = [e for e in lines if e["event"] == "config_reloaded"]
    assert len(reloaded) == 2  # one per worker, for the one good file


async def test_admin_sources_and_metrics_cover_both_workers(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with two_workers(sims, catalog_dsn, redis_url, redis_prefix, tmp_path) as (_, _, base):
        sent = 0
        report: dict[str, Any] = {}
        for _ in range(10):  # rounds of fresh connections, until both workers served some
            for _ in range(20):
                sent += 1
                url = f"{base}/products/{sent}"  # each a miss: one catalog call per request
                async with aiohttp.ClientSession() as http, http.get(url) as resp:
                    assert resp.status == 200, (resp.status, await resp.text())
            for _ in range(50):  # the other worker's counts arrive with its next snapshot
                report = await admin_sources(base)
                if report["sources"]["catalog"]["count"] == sent:
                    break
                await asyncio.sleep(0.1)
            each = report["workers"]["each"]
            if all(w["calls"]["catalog"] > 0 for w in each):
                break
        catalog = report["sources"]["catalog"]
        each = report["workers"]["each"]
        assert len(each) == 2 and all(w["calls"]["catalog"] > 0 for w in each)
        assert catalog["count"] == sent == sum(w["calls"]["catalog"] for w in each)
        assert catalog["outcomes"]["ok"] == sent and catalog["p99_ms"] is not None
        assert report["cache"]["lookups"] == sent and report["cache"]["hits"] == 0
        assert set(catalog["breakers"]) == {str(w["pid"]) for w in each}
        assert "histograms" in report["workers"]["merged"]

        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    pids = {str(w["pid"]) for w in each}
    rss = families["process_resident_memory_bytes"]
    assert {s.labels["pid"] for s in rss.samples} == pids
    assert all(s.value > 0 for s in rss.samples)
    cpu = families["process_cpu_seconds"]
    assert cpu.type == "counter" and {s.labels["pid"] for s in cpu.samples} == pids
    gc = families["python_gc_collections"]
    assert {(s.labels["pid"], s.labels["generation"]) for s in gc.samples} == {
        (pid, g) for pid in pids for g in ("0", "1", "2")
    }
    assert "python_info" in families
    requests = families["gateway_requests"]
    served = sum(s.value for s in requests.samples if s.labels.get("status") == "200")
    assert served >= sent


def test_one_process_metrics_have_the_process_and_python_collectors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    metrics = Metrics()
    metrics.request("GET /x", 200, 0.01)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert "pid" not in families["process_resident_memory_bytes"].samples[0].labels
    assert {"python_gc_collections", "python_info", "gateway_requests"} <= set(families)


async def test_watch_with_two_workers_reloads_both_in_place(
    sims: Simulators, catalog_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, config_text(redis_prefix))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(sims, catalog_dsn, redis_url, admin_token=TOKEN)
    logs = tmp_path / "gateway.log"
    async with gateway_process(path, port, env, logs, "--workers", "2", "--watch"):
        before = await until_each_worker(base, has_extra=False)
        write_atomically(path, with_extra_source(config_text(redis_prefix)))
        assert await until_each_worker(base, has_extra=True) == before


MIX: tuple[Outcome, ...] = ("ok", "ok", "ok", "timeout", "error")


def test_merged_windows_give_the_percentiles_of_all_calls() -> None:
    rng = random.Random(5)
    one, other, both = SourceStats(100), SourceStats(100), SourceStats(100)
    for i in range(3000):
        outcome = rng.choice(MIX)
        ms = rng.expovariate(1 / 30)
        reason = "" if outcome == "ok" else f"{outcome} {i % 7}"
        (one if i % 3 else other).record(outcome, ms, reason)
        both.record(outcome, ms, reason)
    merged = summary(merge_windows([one.window(), other.window()]), 100)
    assert merged == both.snapshot()
    assert merged["count"] == 3000 and merged["p99_ms"] is not None


def test_generations_get_one_number_each_and_only_the_last_few_are_kept(tmp_path: Path) -> None:
    a, b = WorkerDir(str(tmp_path), pid=101), WorkerDir(str(tmp_path), pid=102)
    assert a.latest() == 0 and a.starting() is None
    numbers = [(a if i % 2 else b).publish("gateway.yaml", f"text {i}") for i in range(20)]
    assert numbers == list(range(1, 21))
    assert b.read(20) == ("gateway.yaml", "text 19")
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("gen-"))
    assert kept == sorted(f"gen-{n}.json" for n in range(21 - KEEP_GENERATIONS, 21))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_a_reload_names_each_worker_that_did_not_answer(tmp_path: Path) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = ended.pid  # exited and reaped
    alive = os.getpid()  # alive, and silent
    wd = WorkerDir(str(tmp_path), pid=1)
    number = wd.publish("gateway.yaml", "text")
    WorkerDir(str(tmp_path), pid=7).acknowledge(number, "reloaded")
    WorkerDir(str(tmp_path), pid=8).acknowledge(number, "failed", "pricing: unavailable")
    WorkerDir(str(tmp_path), pid=9).acknowledge(number + 1, "reloaded")
    answers = wd.wait(number, {7, 8, 9, gone, alive}, within_s=0.3)
    assert [(a.pid, a.status) for a in answers] == sorted(
        [(7, "reloaded"), (8, "failed"), (9, "superseded"), (gone, "gone"), (alive, "no answer")]
    )
    done = Everywhere(number, tuple(answers))
    assert done.report() == {
        "generation": number,
        "count": 4,
        "reloaded": 2,
        "failed": [
            {"pid": 8, "status": "failed", "detail": "pricing: unavailable"},
            {"pid": alive, "status": "no answer", "detail": "no answer within 0.3 s"},
        ],
    }


def test_only_live_workers_with_a_fresh_snapshot_count(tmp_path: Path) -> None:
    me = WorkerDir(str(tmp_path))
    me.write_snapshot(b'{"pid": 1}')
    assert me.workers() == {os.getpid()} and me.snapshots() == {}
    stale = WorkerDir(str(tmp_path), pid=os.getppid())
    stale.write_snapshot(b'{"pid": 2}')
    assert me.snapshots() == {os.getppid(): {"pid": 2}}
    old = time.time() - FRESH_S - 1
    os.utime(tmp_path / f"worker-{os.getppid()}.json", (old, old))
    assert me.workers() == {os.getpid()}  # killed without a word, or hung: not counted
    me.leave()
    assert me.workers() == set()
