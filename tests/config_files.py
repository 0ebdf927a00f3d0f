"""gateway.yaml files on disk for tests that reload or run `gateway serve`, and that subprocess.

The file keeps its `${VAR}`s; the test sets them (in `os.environ` or a subprocess's environment),
because a reload reads the environment again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from gateway.demo.simulator import Simulators

ROOT = Path(__file__).resolve().parent.parent

EXTRA_SOURCE = (
    '  extra:     {kind: http, base_url: "${RECS_URL:-http://127.0.0.1:9104}", timeout_ms: 150}\n'
)
"""A source no call uses, added after `recs` by `with_extra_source`."""


GENEROUS = {
    "deadline_ms: 300": "deadline_ms: 5000",
    "deadline_ms: 400\n": "deadline_ms: 5000\n",
    "deadline_ms: 500\n": "deadline_ms: 5000\n",
    "max: 20}\n    timeout_ms: 150": "max: 20}\n    timeout_ms: 2000",
    "timeout_ms: 120": "timeout_ms: 1500",
    "timeout_ms: 100}": "timeout_ms: 1000}",
    "timeout_ms: 200}": "timeout_ms: 2000}",
    "timeout_ms: 150}": "timeout_ms: 2000}",
}
"""Deadline and timeouts far above the shipped ones: a busy test machine must not fail a test
that is not about timing (inventory's becomes `timeout_ms: 1000}`)."""


def config_text(
    key_prefix: str, edit: Mapping[str, str] | None = None, *, generous: bool = True
) -> str:
    """Return the shipped gateway.yaml with its cache under `key_prefix`, its timeouts made
    `GENEROUS` (unless told not to), then `edit` applied."""
    text = (ROOT / "gateway.yaml").read_text()
    for old, new in (GENEROUS if generous else {}).items():
        assert text.count(old) == 1, f"{old!r} must occur once in gateway.yaml"
        text = text.replace(old, new)
    for old, new in (edit or {}).items():
        assert text.count(old) == 1, f"{old!r} must occur once in gateway.yaml"
        text = text.replace(old, new)
    return text.replace("cache:\n  url:", f"cache:\n  key_prefix: '{key_prefix}'\n  url:", 1)


def with_extra_source(text: str) -> str:
    """Return config text with one more source, `extra`, that no endpoint calls."""
    marker = "endpoints:\n"
    assert text.count(marker) == 1
    return text.replace(marker, EXTRA_SOURCE + marker)


def write_config(directory: Path, text: str) -> Path:
    """Write `text` to gateway.yaml in `directory`; return its path."""
    path = directory / "gateway.yaml"
    path.write_text(text)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, as editors and deploy tools do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read(path: Path) -> str:
    """Return a small text file's content."""
    return path.read_text()


def server_env(
    sims: Simulators,
    catalog_dsn: str,
    cache_url: str,
    admin_token: str | None = "admin-token-for-the-tests",
) -> dict[str, str]:
    """Return the variables the shipped gateway.yaml reads, pointing at test servers."""
    env = {
        "CATALOG_DSN": catalog_dsn,
        "REDIS_URL": cache_url,
        "PRICING_URL": sims.urls["pricing"],
        "INVENTORY_URL": sims.urls["inventory"],
        "REVIEWS_URL": sims.urls["reviews"],
        "RECS_URL": sims.urls["recs"],
    }
    if admin_token is not None:
        env["GATEWAY_ADMIN_TOKEN"] = admin_token
    return env


def set_server_env(
    monkeypatch: pytest.MonkeyPatch,
    sims: Simulators,
    catalog_dsn: str,
    cache_url: str,
    admin_token: str | None = "admin-token-for-the-tests",
    **extra: str,
) -> dict[str, str]:
    """Put `server_env`'s variables (and `extra`) in this process's environment for the test, as a
    served gateway (and its reloads) reads them; return them."""
    env = {**server_env(sims, catalog_dsn, cache_url, admin_token), **extra}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@asynccontextmanager
async def gateway_process(
    config: Path, port: int, env: Mapping[str, str], logs: Path, *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `gateway serve` as a subprocess until it answers /healthz; stop it afterwards.

    Its stderr (the logs) goes to the file `logs`: a pipe nobody drains would block it.
    """
    gateway = str(ROOT / ".venv" / "bin" / "gateway")
    with logs.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            gateway,
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            *args,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc, logs)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def start_demo(port: int, *args: str, **env: str) -> asyncio.subprocess.Process:
    """Start `python -m gateway demo --port PORT *args` with `env` added to the environment,
    its stdout and stderr piped (the caller reads them or calls `communicate`)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "demo",
        *args,
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )


async def wait_healthy(
    base: str, proc: asyncio.subprocess.Process, logs: Path | None, within_s: float = 20
) -> None:
    """Return once `base/healthz` answers 200; fail if the process exits (quoting `logs`, where
    its stderr went to a file) or time runs out."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + within_s
    async with aiohttp.ClientSession() as http:
        while loop.time() < ends:
            if proc.returncode is not None:
                said = read(logs) if logs is not None else "(its stderr is a pipe)"
                raise AssertionError(f"gateway exited with {proc.returncode}: {said}")
            try:
                async with http.get(f"{base}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"gateway at {base} not healthy within {within_s} s")


def problems(text: str, file: str = "gw.yaml", env: Mapping[str, str] | None = None) -> list[str]:
    """Return the located problems (`FILE:LINE: path: message`) of config text that must be
    refused."""
    from gateway.config import loader
    from gateway.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        loader.loads(text, file, env or {})
    return [str(p) for p in info.value.problems]
