"""An HTTP client's pool usage, counted from public seams: the calls in flight, and the sockets
the pool opened (open for as long as their descriptor is).

Neither aiohttp nor httpx has public pool counters; reading their private attributes broke
with their releases before. aiohttp hands each new socket to a `socket_factory`; httpx shows a
response's connection as its `network_stream` extension.
"""

from __future__ import annotations

import socket
from typing import Any


class PoolUse:
    """Counts one client's calls in flight and the sockets its pool holds; `stats()` turns them
    into connections in use and idle."""

    __slots__ = ("_sockets", "calls", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0
        """Calls holding a connection or waiting for one (the caller counts them)."""
        self._sockets: dict[Any, Any] = {}  # what identifies a connection -> its socket

    def open_socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """Return a new socket for `addr_info`, as aiohappyeyeballs makes it, counted (aiohttp's
        `socket_factory`)."""
        family, type_, proto = addr_info[:3]
        sock = socket.socket(family=family, type=type_, proto=proto)
        self._add(sock, sock)
        return sock

    def saw(self, stream: Any) -> None:
        """Count the connection under an httpx response's `network_stream`, once."""
        if stream is not None and stream not in self._sockets:
            self._add(stream, stream.get_extra_info("socket"))

    def stats(self) -> dict[str, int]:
        """Return the pool's limit, the connections lent to calls, and those open and idle."""
        self._prune()
        in_use = min(self.calls, self.limit)
        return {"limit": self.limit, "in_use": in_use, "idle": max(len(self._sockets) - in_use, 0)}

    def _add(self, key: Any, sock: Any) -> None:
        if len(self._sockets) >= 2 * self.limit:
            self._prune()  # bounded without scrapes too, when connections come and go
        self._sockets[key] = sock

    def _prune(self) -> None:
        for key, sock in list(self._sockets.items()):
            if sock is None or sock.fileno() == -1:
                del self._sockets[key]
