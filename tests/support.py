"""What tests, bench and reliability share: the one port finder, a throwaway MariaDB, the plain
function fakes of a source (`ok`, `slow`, `failing`, `exploding`; each counts its invocations in
`.calls`), the types of the HTTP-source fixtures, and ASGI calls without a server.

Tests import this module and the package, never `bench` or `reliability`; those two may import
this module (they RUN the gateway the way tests do). The fake upstream HTTP server lives in the
package, `gateway/demo/simulator.py`, because the demo ships it.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pymysql
from multidict import CIMultiDict

from gateway.core.types import Call, Upstream

# --- ports -----------------------------------------------------------------------------------


def free_port(count: int = 1, plus: int | None = None) -> int:
    """Return the first of `count` consecutive free loopback ports (each also free at `+plus`,
    e.g. a Redis Cluster bus port), below the ephemeral range, so that a server restarted on it
    does not find it taken by some client socket meanwhile."""
    for _ in range(500):
        base = random.randint(11000, 22000 - count)
        wanted = [*range(base, base + count)]
        if plus is not None:
            wanted += [p + plus for p in wanted]
        socks: list[socket.socket] = []
        try:
            for port in wanted:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ThrowawayError(f"no {count} consecutive free loopback ports found in 500 tries")


# --- throwaway servers -----------------------------------------------------------------------


class ThrowawayError(RuntimeError):
    """A throwaway server did not start, or a process we started died."""


NICE = ("nice", "-n", "10") if shutil.which("nice") else ()
"""Throwaway infrastructure yields the CPU to the gateway under test (see MariaDB.start)."""


def binary(*names: str) -> str:
    """Return the path of the first of `names` that is installed, or raise with how to install."""
    for name in names:
        for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if path and os.access(path, os.X_OK):
                return path
    raise ThrowawayError(
        f"{names[0]} is not installed: apt-get update && apt-get install -y "
        "mariadb-server redis-server"
    )


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, within_s: float) -> None:
    """Return once something listens on 127.0.0.1:`port`; raise if `proc` exits or time runs out."""
    ends = time.monotonic() + within_s
    while time.monotonic() < ends:
        if proc.poll() is not None:
            raise ThrowawayError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ThrowawayError(f"{what} did not listen on 127.0.0.1:{port} within {within_s} s")


def stop(proc: subprocess.Popen[bytes] | None, grace_s: float = 5.0) -> None:
    """SIGTERM one process we started, SIGKILL after `grace_s`, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def crash(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL one process we started, as a crash would, and reap it."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def redis_server_argv(port: int, workdir: Path, *args: str) -> list[str]:
    """Return the command line of a throwaway redis-server on `port`: loopback, no persistence."""
    return [
        binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *args,
    ]


@dataclass
class MariaDB:
    """A private mariadbd: its own data directory and port; killed and restarted by us."""

    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def install(self) -> None:
        """Create the data directory (about 5 s) and start the server; root may log in over TCP."""
        subprocess.run(
            [
                binary("mariadb-install-db", "mysql_install_db"),
                "--no-defaults",
                f"--datadir={self.workdir}/data",
                f"--user={getpass.getuser()}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=120,
        )
        self.start()
        conn = pymysql.connect(
            unix_socket=f"{self.workdir}/mysqld.sock", user="root", autocommit=True
        )
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'")
                cur.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
        finally:
            conn.close()

    def start(self, within_s: float = 30.0) -> None:
        """Start mariadbd on the same port and data directory; return once it listens.

        Niced, with its commits flushed once a second: in production the database runs on its
        own host, and here its crash recovery and fsyncs must not take the CPU and the disk from
        the gateway under test on the same two cores (the gateway still sees it die and return).
        """
        with (self.workdir / "mariadbd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *NICE,
                    binary("mariadbd", "mysqld"),
                    "--no-defaults",
                    f"--datadir={self.workdir}/data",
                    f"--socket={self.workdir}/mysqld.sock",
                    f"--pid-file={self.workdir}/mysqld.pid",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-flush-log-at-trx-commit=2",
                    f"--user={getpass.getuser()}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port, self.proc, "mariadbd", within_s)

    def crash(self) -> None:
        """kill -9 the server."""
        crash(self.proc)

    def stop(self) -> None:
        stop(self.proc, 15)


# --- fakes of a source -----------------------------------------------------------------------


def counted(body: Callable[[Call, int], Awaitable[Any]]) -> Any:
    """Return a source running `body(call, n)` for its n-th invocation, counted in `.calls`."""

    async def source(call: Call) -> Any:
        source.calls += 1  # type: ignore[attr-defined]
        return await body(call, source.calls)  # type: ignore[attr-defined]

    source.calls = 0  # type: ignore[attr-defined]
    return source


def ok(data: Any = "ok") -> Any:
    """A source that answers `data` (or `data(call)` when it is callable) at once."""

    async def body(call: Call, n: int) -> Any:
        return data(call) if callable(data) else data

    return counted(body)


def slow(seconds: float, data: Any = "ok") -> Any:
    """A source that answers `data` after `seconds`."""

    async def body(call: Call, n: int) -> Any:
        await asyncio.sleep(seconds)
        return data

    return counted(body)


def failing(exc: BaseException) -> Any:
    """A source that raises `exc` (an outage, when it is a SourceError)."""

    async def body(call: Call, n: int) -> Any:
        raise exc

    return counted(body)


def exploding() -> Any:
    """A source with a bug: it raises something that is not a SourceError."""
    return failing(ZeroDivisionError("a bug, not an outage"))


# --- waiting and asking ------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str = "", within_s: float = 5.0) -> None:
    """Return once `condition()` holds; fail, saying `what` was awaited, after `within_s`."""
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what or 'the condition'}: not true within {within_s} s")


async def get(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    """GET `url`; return the status, a copy of the headers and the body."""
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


# --- HTTP sources (conftest's `client`, `server` and `start` fixtures) -------------------------

Client = Literal["aiohttp", "httpx"]
"""The HTTP clients an http source can use; the `client` fixture runs a test with each."""

Start = Callable[..., Awaitable[Upstream]]
"""The `start` fixture: `await start(base_url, **settings)` opens an HTTP source."""


# --- ASGI ------------------------------------------------------------------------------------


def scope(path: str) -> dict[str, Any]:
    """Return the ASGI scope of a plain `GET path`."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


async def asgi_get(app: Any, path: str, disconnect_after_s: float) -> list[dict[str, Any]]:
    """Send `GET path` straight into the ASGI `app`, as a client that hangs up after
    `disconnect_after_s`; return the messages the app sent."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope(path), receive, send)
    return sent


def mysql_connect(url: str) -> pymysql.connections.Connection:
    """A plain pymysql connection (autocommit) to the database of a mysql:// URL, for set-up."""
    dsn = urlsplit(url)
    return pymysql.connect(
        host=dsn.hostname,
        port=dsn.port or 3306,
        user=dsn.username or "",
        password="",
        database=dsn.path.lstrip("/"),
        autocommit=True,
    )


async def pg_execute(dsn: str, *sql: str) -> list[Any]:
    """Run statements on a PostgreSQL database, for set-up; return the last one's rows."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[Any] = []
        for statement in sql:
            rows = await conn.fetch(statement)
        return rows
    finally:
        await conn.close()
