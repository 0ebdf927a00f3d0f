"""HTTP sources: GET one JSON document from an upstream service, through aiohttp or httpx.

Both clients sit behind the same contract. A call is `GET base_url + call.target`, where the
target is already percent-encoded (`Template.render_path`) and is sent byte for byte; query
values are percent-encoded here. There is no client-level timeout: the timeout policy's
`asyncio.timeout` around the call bounds it, and its `TimeoutError` passes through untouched.
Redirects are not followed, so a response can never move a call to another host; a 3xx is a
failure status like any other non-2xx.

Nothing an upstream answers is ever sent back: neither client keeps cookies (a `Set-Cookie` on
one client's call would otherwise ride along on every later call of every client). Bodies are
decompressed by `upstreams.decode`, not by the clients, in bounded slices within `max_bytes`.

Two answer headers count: a 2xx answer's `Cache-Control` (no-store, private, max-age) comes back
with its value as a `cache.directives.Directed` when it says something, and a 429 or 503's
`Retry-After` fails the call with `policies.RetryAfter`, which tells the retry policy how long
to wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from http.cookiejar import Cookie, CookieJar
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl
from multidict import CIMultiDict

from cache.directives import Directed, parse_cache_control
from gateway.core.errors import BadPayload, NotFound, SourceTimeout, SourceUnavailable, Unsendable
from gateway.core.templates import scalar_text
from gateway.core.types import JSON, Call, Upstream
from upstreams.decode import ACCEPT_ENCODING, json_body, read_body
from upstreams.policies import RetryAfter
from upstreams.pool_use import PoolUse


@dataclass(frozen=True, slots=True)
class Propagation:
    """The headers that carry the request id and the remaining budget to HTTP upstreams."""

    request_id_header: str = "X-Request-ID"
    deadline_header: str = "X-Request-Deadline-Ms"


@dataclass(frozen=True, slots=True)
class HttpPoolSettings:
    """Keep-alive connection pool limits of an HTTP source."""

    max: int = 100
    keepalive_s: float = 30.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What an HTTP source's adapter needs: where, with which client, headers and bounds."""

    base_url: str
    client: str = "aiohttp"
    http2: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    max_bytes: int = 1_048_576
    pool: HttpPoolSettings = HttpPoolSettings()
    propagation: Propagation = Propagation()
    """The header names chosen in the config for the request id and the remaining budget."""


PING_TIMEOUT_S = 1.0


async def http_source(name: str, cfg: HttpSettings) -> Upstream:
    """Start one HTTP source: its keep-alive pool and the functions to call, probe and close it.

    Every call carries the request id and the remaining budget in `cfg.propagation`'s headers,
    and the request's W3C trace context (`traceparent`, `tracestate`).
    """
    if cfg.client == "httpx":
        return _httpx_upstream(name, cfg, cfg.propagation)
    return _aiohttp_upstream(name, cfg, cfg.propagation)


# httpx is an extra (`pip install '.[httpx]'`), imported by the first `client: httpx` source;
# until then no httpx error can happen, and `map_errors` catches none.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,)
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = ()
_OTHER_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError)

HTTPX_MISSING = "client: httpx needs httpx: pip install '.[httpx]'"


def httpx_installed() -> bool:
    """Whether the `httpx` extra is installed (checked when a config asks for `client: httpx`)."""
    import importlib.util

    return importlib.util.find_spec("httpx") is not None


def _load_httpx() -> Any:
    global _CONNECT_ERRORS, _TIMEOUT_ERRORS, _OTHER_ERRORS
    import httpx

    _CONNECT_ERRORS = (aiohttp.ClientConnectorError, httpx.ConnectError)
    _TIMEOUT_ERRORS = (httpx.TimeoutException,)
    _OTHER_ERRORS = (aiohttp.ClientError, httpx.HTTPError, httpx.InvalidURL, OSError)
    return httpx


@contextmanager
def map_errors(source: str) -> Iterator[None]:
    """Translate aiohttp, httpx and socket errors into `SourceError`s; let all else through."""
    try:
        yield
    except TimeoutError:
        # The deadline policy's (or aiohttp's, which subclass it): mapped to SourceTimeout outside.
        # CancelledError is a BaseException and is never caught here; nor is anything that is
        # not a network or protocol error, because that is a bug.
        raise
    except _CONNECT_ERRORS as exc:
        raise SourceUnavailable(f"{source}: cannot connect: {exc}", connect=True) from exc
    except _TIMEOUT_ERRORS as exc:
        raise SourceTimeout(f"{source}: {type(exc).__name__}") from exc
    except _OTHER_ERRORS as exc:
        raise SourceUnavailable(f"{source}: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        # A value the client cannot put on the wire (httpx encodes header values as ASCII only):
        # UnicodeEncodeError and its kin are this call's failure, not a bug.
        raise Unsendable(f"{source}: cannot send the request: {type(exc).__name__}") from exc


# --- aiohttp (the default) -------------------------------------------------------------------


def _aiohttp_upstream(name: str, cfg: HttpSettings, prop: Propagation) -> Upstream:
    use = PoolUse(cfg.pool.max)
    connector = aiohttp.TCPConnector(
        limit=cfg.pool.max,
        limit_per_host=0,
        keepalive_timeout=cfg.pool.keepalive_s,
        socket_factory=use.open_socket,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    base, static, max_bytes = cfg.base_url, CIMultiDict(cfg.headers), cfg.max_bytes
    root = yarl.URL(base + "/", encoded=True)

    async def get(call: Call) -> JSON:
        url = yarl.URL(_url(base, call), encoded=True)
        use.calls += 1
        try:
            with map_errors(name):
                async with session.get(
                    url, headers=_headers(static, call, prop), allow_redirects=False
                ) as resp:
                    headers = resp.headers
                    _check(name, resp.status, resp.content_length, max_bytes, headers)
                    encoding = ",".join(headers.getall("Content-Encoding", ()))
                    body = await read_body(name, resp.content.iter_any(), max_bytes, encoding)
        finally:
            use.calls -= 1
        return _directed(json_body(name, resp.status, body), headers.getall("Cache-Control", ()))

    async def ping() -> None:
        async with _ping_bound(name):
            with map_errors(name):
                async with session.get(root, allow_redirects=False):
                    pass

    return Upstream(call=get, close=session.close, ping=ping, pool_stats=use.stats)


# --- httpx (`client: httpx`, e.g. for HTTP/2) ------------------------------------------------


def _httpx_upstream(name: str, cfg: HttpSettings, prop: Propagation) -> Upstream:
    httpx = _load_httpx()
    limits = httpx.Limits(
        max_connections=cfg.pool.max,
        max_keepalive_connections=cfg.pool.max,
        keepalive_expiry=cfg.pool.keepalive_s,
    )
    transport = httpx.AsyncHTTPTransport(http2=cfg.http2, limits=limits)
    # trust_env=False: no proxy or .netrc from the environment may redirect or alter a call.
    client = httpx.AsyncClient(
        transport=transport,
        timeout=None,
        follow_redirects=False,
        trust_env=False,
        cookies=_NoCookies(),
    )
    base, static, max_bytes = cfg.base_url, CIMultiDict(cfg.headers), cfg.max_bytes
    root = httpx.URL(base + "/")
    use = PoolUse(cfg.pool.max)

    async def get(call: Call) -> JSON:
        # httpx keeps existing %XX escapes as they are and only drops literal `.`/`..`
        # segments, which rendered values cannot produce (path_segment escapes them).
        url = httpx.URL(_url(base, call))
        use.calls += 1
        try:
            with map_errors(name):
                async with client.stream("GET", url, headers=_headers(static, call, prop)) as resp:
                    use.saw(resp.extensions.get("network_stream"))
                    headers = resp.headers
                    length = headers.get("content-length", "")
                    size = int(length) if length.isdigit() else None
                    _check(name, resp.status_code, size, max_bytes, headers)
                    encoding = ",".join(headers.get_list("content-encoding"))
                    body = await read_body(name, resp.aiter_raw(), max_bytes, encoding)
        finally:
            use.calls -= 1
        return _directed(json_body(name, resp.status_code, body), headers.get_list("cache-control"))

    async def ping() -> None:
        async with _ping_bound(name):
            with map_errors(name):
                async with client.stream("GET", root):
                    pass

    return Upstream(call=get, close=client.aclose, ping=ping, pool_stats=use.stats)


class _NoCookies(CookieJar):
    """A cookie jar that never stores a cookie, so it never has one to send.

    httpx has no switch for this (encode/httpx#1359, #2992); clearing a jar after each call
    would still leak between concurrent calls.
    """

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Cookie) -> None:
        pass


# --- shared by both clients ------------------------------------------------------------------


def _url(base: str, call: Call) -> str:
    """Return the call's URL: the target as given, then every query key and value escaped."""
    if not call.target.startswith("/"):
        # base + "@host/..." would change the host; templates always start with "/".
        raise ValueError(f"call target must start with '/': {call.target!r}")
    if not call.params:
        return base + call.target
    query = "&".join(f"{quote(str(k), safe='')}={_query_value(v)}" for k, v in call.params.items())
    return f"{base}{call.target}{'&' if '?' in call.target else '?'}{query}"


def _query_value(value: Any) -> str:
    """Escape one query value; a tuple (a batch's ids) is its values, each escaped (a comma
    inside one included), joined by literal commas."""
    if isinstance(value, tuple):
        return ",".join(quote(scalar_text(v), safe="") for v in value)
    return quote(scalar_text(value), safe="")


def _headers(static: CIMultiDict[str], call: Call, prop: Propagation) -> CIMultiDict[str]:
    """Return the source's headers, overridden by the call's, plus request id, trace context
    (W3C `traceparent` and `tracestate`) and deadline."""
    headers = static.copy()
    headers.setdefault("Accept-Encoding", ACCEPT_ENCODING)
    if call.headers:
        headers.update(call.headers)
    if call.request_id:
        headers[prop.request_id_header] = call.request_id
    if call.trace:
        headers["traceparent"] = call.trace
        if call.tracestate:
            headers["tracestate"] = call.tracestate
    if math.isfinite(call.deadline):
        remaining = call.deadline - asyncio.get_running_loop().time()
        headers[prop.deadline_header] = str(max(0, int(remaining * 1000)))
    return headers


def _check(
    source: str, status: int, length: int | None, max_bytes: int, headers: Mapping[str, str]
) -> None:
    """Raise for a failure status (`RetryAfter` for a 429 or 503 that says when to ask again),
    or for a body declared larger than `max_bytes`."""
    if status == 404:
        raise NotFound(f"{source}: HTTP 404")
    if not 200 <= status < 300:
        if status in (429, 503):
            after = retry_after_s(headers.get("Retry-After"), time.time())
            if after is not None:
                raise RetryAfter(f"{source}: HTTP {status}", status=status, after_s=after)
        raise SourceUnavailable(f"{source}: HTTP {status}", status=status)
    if length is not None and length > max_bytes:
        raise BadPayload(f"{source}: body of {length} bytes is over max_bytes ({max_bytes})")


MAX_RETRY_AFTER_CHARS = 64
"""A `Retry-After` longer than this is no value a server sends (an HTTP date is 29): ignored."""


def retry_after_s(value: str | None, now: float) -> float | None:
    """Return the seconds a `Retry-After` value asks to wait from `now` (epoch seconds): its
    delta-seconds, or the time until its HTTP date (0 for a date past); None for no value or
    one that is neither (a negative number, garbage)."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_RETRY_AFTER_CHARS or not value.isascii():
        return None
    if value.isdigit():
        return float(min(int(value), 2**31))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # `-0000`: RFC 5322's "UTC, source zone unknown"
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


def _directed(value: JSON, cache_control: Sequence[str]) -> JSON:
    """Return `value`, with its `Cache-Control` directives when they say something."""
    if not cache_control:
        return value
    directives = parse_cache_control(cache_control)
    return value if directives is None else Directed(value, directives)


@asynccontextmanager
async def _ping_bound(source: str) -> AsyncIterator[None]:
    """Bound a ping by `PING_TIMEOUT_S`, failing with `SourceTimeout` when it runs out."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            yield
    except TimeoutError:
        raise SourceTimeout(f"{source}: no answer to ping within {PING_TIMEOUT_S:g} s") from None
