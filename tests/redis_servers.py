"""Throwaway redis-servers on loopback ports, for tests that stop, stall and restart them."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support import free_port, redis_server_argv

_INSTALL = "apt-get update && apt-get install -y redis-server redis-tools"


def binary(name: str) -> str:
    """Return the path of an installed Redis binary; fail the test with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install it with: {_INSTALL}", pytrace=False)
    return path


def start(port: int, workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start a redis-server on `port` (no persistence) and return once it answers PING."""
    binary("redis-server")  # or fail the test saying how to install it
    proc = subprocess.Popen(
        redis_server_argv(port, workdir, "--enable-debug-command", "yes", *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        for _ in range(100):
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"redis-server on port {port} exited with {proc.returncode}")
                time.sleep(0.05)
        pytest.fail(f"redis-server on port {port} did not answer within 5 s")
    finally:
        client.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a redis-server (no shutdown: clients see their connections drop) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


class Cluster:
    """A throwaway Redis Cluster of masters (no replicas) on free loopback ports, whose nodes a
    test kills by PID and restarts with their own cluster config (so they rejoin)."""

    def __init__(self, workdir: Path, nodes: int = 3, node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        while len(self.ports) < nodes:
            port = free_port(plus=10000)  # and its cluster bus port
            if port not in self.ports:
                self.ports.append(port)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The `redis+cluster://` URL of its first node."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        """Start every node, join them into one cluster and return once it is `ok`."""
        for port in self.ports:
            self.restart(port)
        made = subprocess.run(
            [
                binary("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=30,
        )
        if made.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {made.stdout!r} {made.stderr!r}")
        self.wait_ok(15)

    def restart(self, port: int) -> None:
        """Start the node of `port` (again), with the cluster config it wrote when it ran."""
        self.procs[port] = start(
            port,
            self.workdir,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
        )

    def kill(self, port: int) -> None:
        """Kill the node of `port` by its PID (SIGKILL: no goodbye to its peers or clients)."""
        stop(self.procs.pop(port))

    def state(self, port: int) -> str:
        """Return `cluster_state` as the node of `port` sees it ("ok", "fail"), or "down"."""
        client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return str(client.cluster("INFO").get("cluster_state"))
        except redis.RedisError:
            return "down"
        finally:
            client.close()

    def wait_ok(self, within_s: float) -> None:
        """Return once every running node says the cluster is `ok`; fail after `within_s`."""
        deadline = time.monotonic() + within_s
        while any(self.state(p) != "ok" for p in self.procs):
            if time.monotonic() > deadline:
                states = {p: self.state(p) for p in self.procs}
                pytest.fail(f"the throwaway cluster was not ok within {within_s} s: {states}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill every node that still runs."""
        for port in list(self.procs):
            self.kill(port)
