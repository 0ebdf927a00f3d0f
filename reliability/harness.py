"""Throwaway servers for the reliability runs: a private MariaDB and redis-server on spare loopback
ports, the simulated services as a subprocess, and `gateway serve` on the shipped gateway.yaml
pointed at them. Every process here is started by us and killed by its own handle, never by name.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import prepend_run, tree_version
from gateway.demo.simulator import SERVICES
from tests.support import MariaDB, crash, free_port, redis_server_argv, stop, wait_port
from tests.support import ThrowawayError as HarnessError

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "reliability-admin-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc -----------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """Return a process's resident set size in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise HarnessError(f"no VmRSS for pid {pid}")


# --- servers ---------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A private redis-server without persistence on its own port."""

    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within_s: float = 10.0) -> None:
        """Start redis-server on the same port; return once it listens."""
        self.proc = subprocess.Popen(
            redis_server_argv(self.port, self.workdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc, "redis-server", within_s)

    def crash(self) -> None:
        """kill -9 the server (its data is gone: it restarts empty)."""
        crash(self.proc)

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class SimulatorProcess:
    """`python -m gateway.demo.simulator --port-base N`: the four services in their own process."""

    workdir: Path
    port_base: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> dict[str, str]:
        return {name: f"http://127.0.0.1:{self.port_base + i}" for i, name in enumerate(SERVICES)}

    def start(self, within_s: float = 20.0) -> None:
        """Start the services; return once every one answers /_stats."""
        with (self.workdir / "simulator.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.demo.simulator",
                    "--port-base",
                    str(self.port_base),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for i in range(len(SERVICES)):
            wait_port(self.port_base + i, self.proc, "the simulator", within_s)

    def crash(self) -> None:
        """kill -9 the services: their open connections are reset, new ones refused."""
        crash(self.proc)

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class GatewayProcess:
    """`gateway serve` on the shipped gateway.yaml (or `config`), its addresses from the
    environment."""

    workdir: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    config: Path = ROOT / "gateway.yaml"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "gateway.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError("the gateway has not started")
        return self.proc.pid

    def start(self, within_s: float = 30.0) -> None:
        """Run `gateway serve`; return once /healthz answers 200."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config),
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        ends = time.monotonic() + within_s
        while time.monotonic() < ends:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise HarnessError(f"the gateway was not healthy within {within_s} s; see {self.log}")

    def check_alive(self) -> None:
        """Raise `HarnessError` (with the end of its log) if the gateway has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise HarnessError(f"the gateway exited with {self.proc.returncode}:\n{tail}")

    def admin(self, path: str) -> Any:
        """GET an admin route with the token; return its JSON."""
        req = urllib.request.Request(
            f"{self.base}{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        stop(self.proc, 15)


@dataclass
class Stack:
    """Everything one run needs, started and owned by it."""

    workdir: Path
    mariadb: MariaDB
    redis: RedisServer
    sims: SimulatorProcess
    gateway: GatewayProcess
    catalog_dsn: str


@contextmanager
def stack(workdir: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[Stack]:
    """Start MariaDB, Redis and the simulators (the catalog is seeded by the caller through
    `seed`), yield the stack with the gateway not yet started, and stop everything afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        mariadb = MariaDB(workdir / "mariadb", free_port())
        mariadb.workdir.mkdir(exist_ok=True)
        cleanup.callback(mariadb.stop)
        mariadb.install()
        redis = RedisServer(workdir, free_port())
        cleanup.callback(redis.stop)
        redis.start()
        sims = SimulatorProcess(workdir, free_port(len(SERVICES)))
        cleanup.callback(sims.stop)
        sims.start()
        dsn = mariadb.dsn("catalog")
        env = {
            "CATALOG_DSN": dsn,
            "REDIS_URL": redis.url,
            "PRICING_URL": sims.urls["pricing"],
            "INVENTORY_URL": sims.urls["inventory"],
            "REVIEWS_URL": sims.urls["reviews"],
            "RECS_URL": sims.urls["recs"],
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            **(extra_env or {}),
        }
        gateway = GatewayProcess(workdir, free_port(), env)
        cleanup.callback(gateway.stop)
        yield Stack(workdir, mariadb, redis, sims, gateway, dsn)


def control(url: str, body: Mapping[str, float]) -> bool:
    """POST a behaviour to one simulated service; return False if it did not answer."""
    req = urllib.request.Request(
        f"{url}/_control",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


# --- results ---------------------------------------------------------------------------------


def write_results(path: Path, section: str) -> None:
    """Put `section` first under the marker of a results file, keeping older runs below."""
    head = (
        "# Reliability results\n\nProduced by `reliability/chaos.py` and `reliability/soak.py`; "
        "how to read them: reliability/README.md. Newest run first."
    )
    prepend_run(path, head, section)


def summary_head(title: str, summary: Mapping[str, Any], rows: list[tuple[str, str]]) -> list[str]:
    """Return a run's heading, its tree and machine, and its figures as a two-column table."""
    return [
        title,
        "",
        f"- tree: {summary['tree']}; machine: {summary['machine']}",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]


def run_and_report(
    kind: str,
    run: Callable[[Any, Path], Coroutine[Any, Any, dict[str, Any]]],
    args: Any,
    table: Callable[[dict[str, Any]], str],
    notes: Callable[[dict[str, Any]], list[str]],
) -> int:
    """Run `run(args, workdir)` on uvloop, print and record its summary; return the exit status.

    0 when the summary passed, 1 when a check failed, 2 when a server would not start. The work
    directory (logs) is kept when a check failed or `args.keep` is set.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"gateway-{kind}-"))
    try:
        try:
            import uvloop
        except ImportError:
            summary = asyncio.run(run(args, workdir))
        else:
            summary = uvloop.run(run(args, workdir))
    except HarnessError as exc:
        print(f"{kind}: could not run: {exc}\nlogs: {workdir}", file=sys.stderr)
        return 2
    text = table(summary)
    print(text)
    for line in notes(summary):
        print(line)
    write_results(args.results, text)
    print("SUMMARY " + json.dumps(summary, default=str))
    if args.keep or not summary["passed"]:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["passed"] else 1


def run_stamp(kind: str) -> dict[str, str]:
    """Return the head of a run's summary: its kind, when it ran, the tree and the machine."""
    return {
        "kind": kind,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tree": tree_version(),
        "machine": machine(),
    }


def machine() -> str:
    """Return CPU count and load average, for the reader of a result."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def box_cpu() -> tuple[int, int]:
    """Return (busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_cpu_s(pid: int) -> float:
    """Return the CPU seconds (user + system) a process has used, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
