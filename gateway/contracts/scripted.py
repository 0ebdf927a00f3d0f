"""Scripted upstreams for one case: each source's answers handed out in call order, and a note of
everything the gateway sent that its script did not expect.

HTTP sources are answered by a loopback `UpstreamServer` with `http_handler`; SQL sources by an
`Upstream` (`sql_upstream`) that returns the scripted rows as the SQL adapters return theirs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.contracts.compare import ABSENT, same_json, show
from gateway.contracts.model import HttpAnswer, HttpExpect, Script, SqlAnswer
from gateway.core.errors import SourceUnavailable
from gateway.core.plan import SourcePlan, open_upstream
from gateway.core.types import JSON, Call, Upstream
from gateway.demo.simulator import Handler, idle
from gateway.runtime import OpenSource
from upstreams.sql import json_result


class Played:
    """One source's script as the case plays it: the next answer for each request, and the
    problems seen (a request past the last answer, a request its answer did not expect)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests = 0
        self.served = [0] * len(script.answers)
        self.mismatches: list[str] = []

    def take(self) -> tuple[int, HttpAnswer | SqlAnswer | None]:
        """Count one request; return its number (from 1) and its answer (None: none is left)."""
        self.requests += 1
        answers = self.script.answers
        index = 0 if self.script.repeat else self.requests - 1
        if index >= len(answers):
            return self.requests, None
        self.served[index] += 1
        return self.requests, answers[index]

    def mismatch(self, number: int, what: str) -> None:
        """Note that request `number` was not what its answer expected."""
        self.mismatches.append(f"{self.script.source}: request {number}: {what}")

    def problems(self) -> list[str]:
        """Return what went wrong with this source in the case, for its failure text."""
        found = list(self.mismatches)
        scripted = len(self.script.answers)
        if not self.script.repeat and self.requests > scripted:
            found.append(
                f"{self.script.source}: {_count(self.requests, 'request')}, "
                f"{_count(scripted, 'scripted answer')}"
            )
        for i, answer in enumerate(self.script.answers):
            if answer.expect is not None and not self.served[i]:
                which = "its answer" if self.script.repeat else f"answer {i + 1}"
                found.append(f"{self.script.source}: {which} expects a request; none came")
        return found


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def http_handler(played: Played) -> Handler:
    """Return the handler that answers every request to an HTTP source from its script."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        number, answer = played.take()
        if answer is None:
            left = b'{"error": "no scripted answer left"}'
            return web.Response(status=500, body=left, content_type="application/json")
        assert isinstance(answer, HttpAnswer)
        if answer.expect is not None:
            for what in _http_mismatches(answer.expect, request):
                played.mismatch(number, what)
        if answer.delay_ms:
            await idle(answer.delay_ms / 1000)
        headers = CIMultiDict(answer.headers)
        headers.setdefault("Content-Type", "application/json")
        if "json_" in answer.model_fields_set:
            body = orjson.dumps(answer.json_)
        else:
            body = (answer.body or "").encode()
        return web.Response(status=answer.status, body=body, headers=headers)

    return handle


def _http_mismatches(expect: HttpExpect, request: web.BaseRequest) -> list[str]:
    found = []
    path, _, query = request.raw_path.partition("?")
    if expect.path is not None and expect.path not in (path, unquote(path)):
        found.append(f"path: expected {expect.path}, got {path}")
    if expect.query is not None:
        got = dict(parse_qsl(query, keep_blank_values=True))
        for name, value in expect.query.items():
            if got.get(name) != value:
                found.append(f"query {name}: expected {_show(value)}, got {_show(got.get(name))}")
    for header, wanted in expect.headers.items():
        sent = request.headers.get(header)
        if sent != wanted:
            found.append(f"header {header}: expected {_show(wanted)}, got {_show(sent)}")
    return found


def _show(value: Any) -> str:
    return show(ABSENT if value is None else value)


def sql_upstream(played: Played) -> Upstream:
    """Return a started SQL source that answers each call with the script's next answer: its
    rows made JSON as the SQL adapters make theirs (`one`, no row is `NotFound`), or its error
    as `SourceUnavailable`, after its delay."""
    name = played.script.source

    async def call(call: Call) -> JSON:
        number, answer = played.take()
        if answer is None:
            raise SourceUnavailable(f"{name}: no scripted answer left")
        assert isinstance(answer, SqlAnswer)
        if answer.expect is not None:
            for key, value in answer.expect.params.items():
                got = call.params.get(key)
                if not same_json(value, got):
                    what = f"param {key}: expected {_show(value)}, got {_show(got)}"
                    played.mismatch(number, what)
        if answer.delay_ms:
            await asyncio.sleep(answer.delay_ms / 1000)
        if answer.error is not None:
            raise SourceUnavailable(f"{name}: {answer.error}")
        return json_result(name, [dict(r) for r in answer.rows or ()], call.one, call.max_rows)

    async def nothing() -> None:
        return None

    return Upstream(call=call, close=nothing, ping=nothing, pool_stats=dict)


def opener(played: Mapping[str, Played]) -> OpenSource:
    """Return the runtime's `open_source` for a case: SQL sources scripted, HTTP sources opened
    by their adapter (their base URLs point at the case's servers)."""

    async def open_source(name: str, plan: SourcePlan) -> Upstream:
        if plan.kind.kind == "sql":
            return sql_upstream(played[name])
        return await open_upstream(name, plan)

    return open_source
