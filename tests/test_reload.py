"""Hot reload: under load without a failed request, refused when invalid, by SIGHUP and --watch,
keeping the pools of unchanged sources and closing removed ones after their grace."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Gateway, create_app
from tests.config_files import (
    config_text,
    gateway_process,
    with_extra_source,
    write_atomically,
    write_config,
)
from tests.serving import serving
from tests.support import free_port

PRODUCTS = 500
TOKEN = "reload-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RELOADS = 20
LOOPS = 4
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def env(served_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return served_env(TOKEN)


def two_configs(prefix: str, generous: bool = True) -> tuple[str, str]:
    """Return two valid configs: the shipped one, and one with an extra source and another
    inventory timeout (so inventory's pool is replaced on every swap)."""
    timeout = "timeout_ms: 1000}" if generous else "timeout_ms: 100}"
    a = config_text(prefix, generous=generous)
    b = with_extra_source(config_text(prefix, {timeout: "timeout_ms: 110}"}, generous=generous))
    return a, b


async def source_names(http: aiohttp.ClientSession, base: str) -> set[str]:
    async with http.get(f"{base}/admin/config", headers=AUTH) as resp:
        assert resp.status == 200
        return set((await resp.json())["config"]["sources"])


async def test_twenty_reloads_under_steady_load_fail_no_request(
    env: dict[str, str], tmp_path: Path, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    a, b = two_configs(redis_prefix)
    path = write_config(tmp_path, a)
    statuses: dict[int, int] = {}
    failures: list[str] = []
    done = asyncio.Event()
    async with serving(create_app(str(path))) as base:

        async def load(seed: int) -> None:
            rng = random.Random(seed)
            loop = asyncio.get_running_loop()
            ends = loop.time() + 60  # bounded in time and count whatever happens
            for _ in range(20_000):
                if done.is_set() or loop.time() > ends:
                    return
                url = f"{base}/products/{rng.randint(1, PRODUCTS)}"
                try:
                    async with http.get(url) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                        if resp.status != 200:
                            failures.append(f"{url}: {resp.status}")
                except aiohttp.ClientError as exc:
                    failures.append(f"{url}: {exc!r}")

        loops = [asyncio.create_task(load(i)) for i in range(LOOPS)]
        reloads = []
        try:
            await asyncio.sleep(0.2)
            for i in range(RELOADS):
                write_atomically(path, b if i % 2 == 0 else a)
                async with http.post(f"{base}/admin/reload", headers=AUTH) as resp:
                    reloads.append((resp.status, await resp.json()))
                await asyncio.sleep(0.25)
            await asyncio.sleep(0.2)
        finally:
            done.set()
            await asyncio.gather(*loops)
        assert await source_names(http, base) == {
            "catalog",
            "pricing",
            "inventory",
            "reviews",
            "recs",
        }
    requests = sum(statuses.values())
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "reload-under-load.json").write_text(
        json.dumps({"reloads": len(reloads), "requests": requests, "failed": len(failures)})
    )
    print(f"reload under load: {len(reloads)} reloads, {requests} requests, {len(failures)} failed")
    assert [s for s, _ in reloads] == [200] * RELOADS
    assert reloads[0][1]["opened"] == ["inventory", "extra"]
    assert reloads[1][1]["closing"] == ["inventory", "extra"]
    assert failures == []
    assert requests >= 200


async def test_a_bad_file_is_refused_with_its_lines_and_the_old_config_keeps_serving(
    env: dict[str, str], tmp_path: Path, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    good = config_text(redis_prefix)
    path = write_config(tmp_path, good)
    async with serving(create_app(str(path))) as base:
        for wrong, right, field in [
            ("source: inventroy", "source: inventory", "calls.stock.source"),
            ("timeout_ms: fast", "timeout_ms: 1500", "sources.pricing.timeout_ms"),
            ("deadline_ms: [5000", "deadline_ms: 5000", "(yaml)"),
        ]:
            bad = good.replace(right, wrong, 1)
            path.write_text(bad)
            async with http.post(f"{base}/admin/reload", headers=AUTH) as resp:
                assert resp.status == 400
                body = await resp.json()
            assert body["error"] == "invalid config"
            (line,) = {n + 1 for n, text in enumerate(bad.splitlines()) if wrong in text}
            (problem,) = body["problems"]
            file_line, where, _ = problem.split(": ", 2)
            assert file_line in (f"{path}:{line}", f"{path}:{line + 1}"), problem
            assert where.endswith(field), problem
            async with http.get(f"{base}/products/3") as resp:
                assert resp.status == 200
                assert (await resp.json())["_meta"]["complete"] is True
        async with http.get(f"{base}/admin/config", headers=AUTH) as resp:
            assert (await resp.json())["config"]["sources"]["pricing"]["timeout_ms"] == 1500


async def test_reload_keeps_unchanged_pools_and_closes_removed_ones_after_their_grace(
    env: dict[str, str], tmp_path: Path, redis_prefix: str, http: aiohttp.ClientSession
) -> None:
    a, b = two_configs(redis_prefix, generous=False)  # the grace is the shipped 300 ms + 1 s
    path = write_config(tmp_path, b)
    app = create_app(str(path))
    gw: Gateway = app.state.gateway
    async with serving(app) as base:
        before = gw.current()
        closed_at: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        for name in ("extra", "inventory", "pricing"):
            upstream = before.upstreams[name]
            real_close = upstream.close

            async def close(name: str = name, real_close=real_close) -> None:  # type: ignore[no-untyped-def]
                closed_at[name] = loop.time()
                await real_close()

            upstream.close = close
        path.write_text(a)
        started = loop.time()
        async with http.post(f"{base}/admin/reload", headers=AUTH) as resp:
            assert resp.status == 200
            body = await resp.json()
        after = gw.current()
        assert body["kept"] == ["catalog", "pricing", "reviews", "recs"]
        assert body["closing"] == ["inventory", "extra"]
        for name in ("catalog", "pricing", "reviews", "recs"):
            assert after.upstreams[name] is before.upstreams[name]
        assert after.upstreams["inventory"] is not before.upstreams["inventory"]
        assert "extra" not in after.upstreams
        # Requests still running on the old runtime may use its pools until its deadline passes.
        await asyncio.sleep(0.2)
        assert closed_at == {}
        for _ in range(100):
            if len(closed_at) == 2:
                break
            await asyncio.sleep(0.1)
        assert set(closed_at) == {"inventory", "extra"}
        grace = 0.3 + 1.0  # the endpoint's deadline_ms plus a second
        assert all(grace - 0.05 <= t - started <= grace + 3 for t in closed_at.values())
        async with http.get(f"{base}/products/11") as resp:
            assert resp.status == 200
            assert (await resp.json())["_meta"]["complete"] is True


@asynccontextmanager
async def served_file(
    env: dict[str, str], redis_prefix: str, tmp_path: Path, *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path, str, str]]:
    """Run `gateway serve *args` on config A, written to a file; yield the process, the file,
    config B and the base URL. Its log is gateway.log in `tmp_path`."""
    a, b = two_configs(redis_prefix)
    path = write_config(tmp_path, a)
    port = free_port()
    async with gateway_process(path, port, env, tmp_path / "gateway.log", *args) as proc:
        yield proc, path, b, f"http://127.0.0.1:{port}"


async def wait_for_extra(http: aiohttp.ClientSession, base: str) -> None:
    """Return once the served config has the `extra` source (or after 10 s of asking)."""
    for _ in range(100):
        if "extra" in await source_names(http, base):
            return
        await asyncio.sleep(0.1)


async def test_sighup_reloads_a_served_gateway(
    env: dict[str, str], redis_prefix: str, tmp_path: Path
) -> None:
    async with (
        served_file(env, redis_prefix, tmp_path) as (proc, path, b, base),
        aiohttp.ClientSession() as http,
    ):
        assert "extra" not in await source_names(http, base)
        write_atomically(path, b)
        proc.send_signal(signal.SIGHUP)
        await wait_for_extra(http, base)
        assert "extra" in await source_names(http, base)
        async with http.get(f"{base}/products/5") as resp:
            assert resp.status == 200
        path.write_text(b.replace("timeout_ms: 110", "timeout_ms: soon"))
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert "extra" in await source_names(http, base)  # refused: still the last good one
        assert proc.returncode is None
    text = (tmp_path / "gateway.log").read_text()
    assert '"config_reload_refused"' in text and "timeout_ms" in text


async def test_watch_reloads_when_the_file_changes(
    env: dict[str, str], redis_prefix: str, tmp_path: Path
) -> None:
    async with (
        served_file(env, redis_prefix, tmp_path, "--watch") as (_, path, b, base),
        aiohttp.ClientSession() as http,
    ):
        assert "extra" not in await source_names(http, base)
        write_atomically(path, b)
        await wait_for_extra(http, base)
        assert "extra" in await source_names(http, base)
