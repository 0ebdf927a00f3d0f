"""A 429 or 503 with `Retry-After` is retried after that wait when it fits the remaining budget,
and at once fails the call when it does not; 429 only where `retry.on` lists it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import loader as config
from gateway.core.errors import SourceUnavailable
from gateway.core.types import Call, Upstream
from gateway.demo.simulator import Handler, UpstreamServer, json_body
from tests.serving import serving_config
from tests.support import Start, counted
from upstreams.http import retry_after_s
from upstreams.policies import Budget, Retry, RetryAfter, RetrySettings

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("9" * 64, float(2**31)),
        ("9" * 65, None),
        ("٣", None),  # a digit, but not an ASCII one
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 3600, usegmt=True), 0.0),  # a date past: no wait
        ("Tue, 15 Nov 1994 08:12:31 -0000", 0.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 253402300799.0 - NOW),
        ("Mon, 99 Foo 99999 99:99:99 GMT", None),
    ],
)
def test_retry_after_values_are_read_safely(value: str | None, expected: float | None) -> None:
    assert retry_after_s(value, NOW) == expected


# --- the retry policy, with plain-function sources ---------------------------------------------


def make_call(deadline_s: float, timeout_s: float = 0.2) -> Call:
    loop = asyncio.get_running_loop()
    return Call("s", "c", "/x", {}, timeout_s, loop.time() + deadline_s)


def asks_to_wait(after_s: float, status: int = 503, data: Any = "ok") -> Any:
    """A source whose first answer asks for `after_s` seconds; it records when it was called."""

    async def body(call: Call, n: int) -> Any:
        source.at.append(time.monotonic())
        if n == 1:
            raise RetryAfter(f"s: HTTP {status}", status=status, after_s=after_s)
        return data

    source = counted(body)
    source.at = []
    return source


def settings(**fields: Any) -> RetrySettings:
    base: dict[str, Any] = {"attempts": 3, "backoff_ms": 1, "jitter": False, "on": (503, 429)}
    return RetrySettings(**(base | fields))


async def test_a_wait_that_fits_is_waited_instead_of_the_backoff() -> None:
    source = asks_to_wait(0.3)
    retry = Retry(settings())
    assert await retry(source)(make_call(2.0)) == "ok"
    assert source.calls == 2 and retry.retries == 1
    assert 0.28 <= source.at[1] - source.at[0] < 1.5


async def test_a_wait_longer_than_the_budget_fails_at_once() -> None:
    source = asks_to_wait(5.0)
    retry = Retry(settings())
    t0 = time.monotonic()
    with pytest.raises(RetryAfter):
        await retry(source)(make_call(2.0))
    assert time.monotonic() - t0 < 0.5
    assert source.calls == 1 and retry.refused_deadline == 1


async def test_the_wait_must_leave_a_whole_attempt_before_the_deadline() -> None:
    # 0.9 s of wait and a 0.2 s attempt do not fit in 1 s.
    source = asks_to_wait(0.9)
    retry = Retry(settings())
    with pytest.raises(RetryAfter):
        await retry(source)(make_call(1.0, timeout_s=0.2))
    assert source.calls == 1 and retry.refused_deadline == 1


async def test_429_is_retried_only_when_retry_on_lists_it() -> None:
    source = asks_to_wait(0.0, status=429)
    with pytest.raises(RetryAfter):
        await Retry(settings(on=(503,)))(source)(make_call(2.0))
    assert source.calls == 1
    source = asks_to_wait(0.0, status=429)
    assert await Retry(settings(on=(429,)))(source)(make_call(2.0)) == "ok"
    assert source.calls == 2


async def test_a_retry_after_still_spends_the_retry_budget() -> None:
    budget = Budget(0.0, min_retries=1)
    retry = Retry(settings(), budget)
    assert await retry(asks_to_wait(0.0))(make_call(2.0)) == "ok"
    source = asks_to_wait(0.0)
    with pytest.raises(RetryAfter):
        await retry(source)(make_call(2.0))  # the one retry of the window is spent
    assert source.calls == 1 and retry.refused_budget == 1


async def test_a_failure_without_retry_after_keeps_the_backoff() -> None:
    at: list[float] = []

    async def body(call: Call, n: int) -> Any:
        at.append(time.monotonic())
        raise SourceUnavailable("s: HTTP 503", status=503)

    source = counted(body)
    retry = Retry(settings(attempts=2, backoff_ms=100))
    with pytest.raises(SourceUnavailable):
        await retry(source)(make_call(2.0))
    # The backoff is waited (no Retry-After to replace it), and nothing longer.
    assert source.calls == 2 and 0.09 <= at[1] - at[0] < 1.0, at


# --- the HTTP adapter, once per client ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "header", "kind", "after"),
    [
        (503, "2", RetryAfter, 2.0),
        (429, "0", RetryAfter, 0.0),
        (503, "-5", SourceUnavailable, None),  # ignored: an ordinary 503
        (503, "garbage", SourceUnavailable, None),
        (500, "2", SourceUnavailable, None),  # only 429 and 503 say when to ask again
    ],
)
async def test_the_adapter_reads_retry_after_on_429_and_503(
    server: UpstreamServer,
    start: Start,
    status: int,
    header: str,
    kind: type[SourceUnavailable],
    after: float | None,
) -> None:
    server.route("/", json_body({}, status, headers={"Retry-After": header}))
    upstream: Upstream = await start(server.url)
    loop = asyncio.get_running_loop()
    with pytest.raises(SourceUnavailable) as info:
        await upstream.call(Call("test", "c", "/x", {}, 5.0, loop.time() + 5.0))
    assert type(info.value) is kind and info.value.status == status
    assert getattr(info.value, "after_s", None) == after
    assert str(info.value) == f"test: HTTP {status}"  # the reason stays short and stable


# --- the whole gateway -------------------------------------------------------------------------

CONFIG = """\
version: 1
cache: {{url: "memory://"}}
sources:
  up:
    kind: http
    base_url: "{base}"
    timeout_ms: 300
    retry: {{attempts: 2, backoff_ms: 1, on: [{on}]}}
endpoints:
  - path: /things/{{id:int}}
    deadline_ms: 2200
    calls:
      main: {{source: up, path: "/a/{{id}}", required: true}}
      extra: {{source: up, path: "/b/{{id}}", fallback: null}}
"""


def first_asks(status: int, retry_after: str, times: list[float]) -> Handler:
    """Answer the first request with `status` and `Retry-After`, the others with 200."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        times.append(asyncio.get_running_loop().time())
        if len(times) == 1:
            return web.json_response({}, status=status, headers={"Retry-After": retry_after})
        return web.json_response({"n": len(times)})

    return handle


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        server.route("/a/", json_body({"a": 1}))
        yield server


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    async with http.get(f"{url}/things/1") as resp:
        return resp.status, await resp.json(), time.monotonic() - t0


async def test_a_retry_after_that_fits_is_retried_once_after_the_wait(
    upstream: UpstreamServer, http: aiohttp.ClientSession
) -> None:
    times: list[float] = []
    upstream.route("/b/", first_asks(503, "1", times))
    loaded = config.loads(CONFIG.format(base=upstream.url, on="503"), "gw.yaml", {})
    async with serving_config(loaded) as url:
        status, doc, _ = await get(http, url)
    assert status == 200 and doc["extra"] == {"n": 2}, doc
    assert len(times) == 2
    assert 0.95 <= times[1] - times[0] < 2.0  # waited the second asked, not the 1 ms backoff


@pytest.mark.parametrize(
    ("status", "retry_after", "on"),
    [
        (503, "30", "503"),  # far longer than the 2.2 s deadline
        (503, "2", "503"),  # within the 2.2 s deadline, but not with a 0.3 s attempt after it
        (429, "0", "503"),  # 429 is not listed
    ],
)
async def test_a_retry_after_that_does_not_fit_fails_the_call_at_once(
    upstream: UpstreamServer,
    http: aiohttp.ClientSession,
    status: int,
    retry_after: str,
    on: str,
) -> None:
    times: list[float] = []
    upstream.route("/b/", first_asks(status, retry_after, times))
    loaded = config.loads(CONFIG.format(base=upstream.url, on=on), "gw.yaml", {})
    async with serving_config(loaded) as url:
        code, doc, elapsed = await get(http, url)
    assert code == 200 and doc["extra"] is None  # the optional call failed, its fallback
    assert doc["_meta"]["sources"]["extra"] == "error"
    assert len(times) == 1
    assert elapsed < 1.5  # neither the Retry-After nor the deadline was waited for
