"""upstreams/pool_use.py: pool usage counted from calls in flight and the sockets a pool opened,
alone and under both HTTP clients against a real loopback server."""

from __future__ import annotations

import asyncio
import socket

from gateway.core.types import Call
from gateway.demo.simulator import UpstreamServer, hang, raw
from tests.support import Start, until
from upstreams.pool_use import PoolUse

LOOPBACK = (socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 0))


def call(target: str) -> Call:
    deadline = asyncio.get_running_loop().time() + 5.0
    return Call(source="test", name="c", target=target, params={}, timeout=5.0, deadline=deadline)


def test_open_sockets_are_idle_until_lent_or_closed() -> None:
    use = PoolUse(4)
    socks = [use.open_socket(LOOPBACK) for _ in range(3)]
    try:
        assert use.stats() == {"limit": 4, "in_use": 0, "idle": 3}
        use.calls = 6  # more calls than the pool lends: the rest are waiting
        assert use.stats() == {"limit": 4, "in_use": 4, "idle": 0}
        use.calls = 1
        socks[0].close()
        assert use.stats() == {"limit": 4, "in_use": 1, "idle": 1}
    finally:
        for sock in socks:
            sock.close()
    use.calls = 0
    assert use.stats() == {"limit": 4, "in_use": 0, "idle": 0}


def test_a_pool_whose_connections_come_and_go_keeps_counting_only_the_open_ones() -> None:
    use = PoolUse(2)
    for _ in range(50):  # no scrape in between
        use.open_socket(LOOPBACK).close()
    kept = use.open_socket(LOOPBACK)
    try:
        assert use.stats() == {"limit": 2, "in_use": 0, "idle": 1}
    finally:
        kept.close()


async def test_a_connection_the_upstream_closes_stops_counting_as_idle(
    server: UpstreamServer, start: Start
) -> None:
    server.route("/keep", raw(b"{}"))
    server.route("/bye", raw(b"{}", headers={"Connection": "close"}))
    server.route("/hang", hang())
    upstream = await start(server.url)
    await upstream.call(call("/keep"))
    assert upstream.pool_stats()["idle"] == 1
    await upstream.call(call("/bye"))  # on the same connection, which the upstream then closes
    await until(lambda: upstream.pool_stats()["idle"] == 0, "the closed socket is not counted")
    task = asyncio.ensure_future(upstream.call(call("/hang")))
    await server.wait_seen(3)
    assert upstream.pool_stats()["in_use"] == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert upstream.pool_stats()["in_use"] == 0
