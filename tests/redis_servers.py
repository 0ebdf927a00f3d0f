"""Throwaway redis-servers on loopback ports, for tests that stop, stall and restart them."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

_INSTALL = "apt-get update && apt-get install -y redis-server redis-tools"


def binary(name: str) -> str:
    """Return the path of an installed Redis binary; fail the test with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install it with: {_INSTALL}", pytrace=False)
    return path


def free_port() -> int:
    """Return a loopback port that is free, and whose cluster bus port (+10000) is free too."""
    # Both below the kernel's ephemeral range (32768+), where a client socket could take them.
    for _ in range(200):
        port = random.randint(11000, 22000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port pair found in 200 tries")


def start(port: int, workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start a redis-server on `port` (no persistence) and return once it answers PING."""
    proc = subprocess.Popen(
        [
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
            "--enable-debug-command",
            "yes",
            *args,
        ],
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
