"""Hostile upstream answers, as aiohttp.web handlers: cookies, decompression bombs, deep JSON.

Used by the chaos run's hostile mode and by tests/test_attacks_upstream.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from functools import lru_cache

from aiohttp import web

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

COOKIES = (
    "sid=upstream-session-1; Path=/",
    "tenant=upstream-2; Path=/; Domain=localhost",
    "token=upstream-3; Path=/; Max-Age=3600; HttpOnly",
    "wide=upstream-4; Path=/; Domain=127.0.0.1",
)
"""Set-Cookie values a hostile upstream sends; none may ever come back in a `Cookie` header."""


@lru_cache(maxsize=4)
def gzip_bomb(inflated: int) -> bytes:
    """Return a gzip body of about `inflated / 1000` bytes that inflates to `inflated` zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(inflated // len(block))]
    parts.append(packer.compress(bytes(inflated % len(block))))
    parts.append(packer.flush())
    return b"".join(parts)


def deep_json(levels: int) -> bytes:
    """Return a JSON object nested `levels` deep: `{"a": {"a": ... {} ...}}`."""
    return b'{"a": ' * (levels - 1) + b"{}" + b"}" * (levels - 1)


def set_cookies(then: Handler) -> Handler:
    """Answer like `then`, with every one of `COOKIES` added as its own Set-Cookie header."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        resp = await then(request)
        for cookie in COOKIES:
            resp.headers.add("Set-Cookie", cookie)
        return resp

    return handle
