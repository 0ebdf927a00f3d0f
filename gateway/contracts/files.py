"""Contract files: read with a line for every value, validated into the models of
`gateway.contracts.model`, and checked against the config they test; every problem is a
`Problem` (`FILE:LINE: path: message`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from starlette.routing import compile_path

from gateway.config.fieldpath import Loc, dotted
from gateway.config.kinds import kind_of
from gateway.config.loader import line_of, read_yaml
from gateway.config.schema import EndpointConfig, GatewayConfig
from gateway.contracts.model import (
    Answer,
    Case,
    CaseModel,
    Contract,
    ContractModel,
    HttpAnswer,
    Script,
    SqlAnswer,
)
from gateway.core import templates
from gateway.core.errors import ConfigError, Problem


def contract_files(paths: list[str]) -> tuple[list[str], list[Problem]]:
    """Return the contract files `paths` name (directories: their *.yaml, sorted), and a problem
    for each path that does not exist."""
    files: list[str] = []
    problems: list[Problem] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(str(f) for f in sorted(path.rglob("*.yaml")))
        elif path.is_file():
            files.append(str(path))
        else:
            problems.append(Problem(p, 0, "(file)", "no such file or directory"))
    return files, problems


def load_contract(file: str, config: GatewayConfig) -> Contract:
    """Read and check one contract file against `config`; raise `ContractError` listing every
    problem with its line."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractError([Problem(file, 0, "(file)", f"cannot read: {exc}")]) from None
    return loads_contract(text, file, config)


class ContractError(Exception):
    """A contract file is invalid; carries every problem found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.path))
        super().__init__("\n".join(str(p) for p in self.problems))


def loads_contract(text: str, file: str, config: GatewayConfig) -> Contract:
    """Check contract text against `config`; raise `ContractError` listing every problem."""
    lines: dict[Loc, int] = {}
    problems: list[Problem] = []
    try:
        data = read_yaml(text, file, lines, problems, _as_is)
    except ConfigError as exc:  # not YAML, empty, or too large once aliases expand
        raise ContractError(exc.problems) from None
    if problems:
        raise ContractError(problems)

    def problem(loc: Loc, message: str) -> Problem:
        return Problem(file, line_of(lines, loc), dotted(loc), message)

    try:
        model = ContractModel.model_validate(data)
    except ValidationError as exc:
        raise ContractError(_located(exc, (), problem)) from None
    endpoint = next((e for e in config.endpoints if e.path == model.endpoint), None)
    if endpoint is None:
        known = ", ".join(e.path for e in config.endpoints)
        why = f"no endpoint {model.endpoint} in the config (it has: {known})"
        problems.append(problem(("endpoint",), why))
    cases: list[Case] = []
    names: set[str] = set()
    for i, raw in enumerate(model.cases):
        at: Loc = ("cases", i)
        case = None
        try:
            case = CaseModel.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_located(exc, at, problem))
        if case is not None and case.name in names:
            problems.append(problem((*at, "name"), f"a case named {case.name!r} comes earlier"))
        names.add(str(raw.get("name")))
        if endpoint is None:
            continue
        # The upstreams are checked even when the rest of the case is not valid.
        upstreams = raw.get("upstreams")
        scripts = _scripts(upstreams, at, endpoint, config, problem, problems)
        if case is None:
            continue
        route = compile_path(templates.starlette_path(endpoint.path))[0]
        if not route.fullmatch(case.request.path.partition("?")[0]):
            why = f"{case.request.path} is not a path of {endpoint.path}"
            problems.append(problem((*at, "request", "path"), why))
        cases.append(Case(case.name, line_of(lines, at), case.request, scripts, case.expect))
    if problems or endpoint is None:
        raise ContractError(problems)
    return Contract(file, endpoint.path, tuple(cases))


def _scripts(
    upstreams: Any,
    at: Loc,
    endpoint: EndpointConfig,
    config: GatewayConfig,
    problem: Callable[[Loc, str], Problem],
    problems: list[Problem],
) -> dict[str, Script]:
    """Return the scripts of a case's `upstreams` (each source the endpoint uses and the case
    does not script: no answer), noting each problem."""
    used = _sources_used(endpoint, config)
    scripts: dict[str, Script] = {}
    for source, entry in (upstreams if isinstance(upstreams, dict) else {}).items():
        loc = (*at, "upstreams", source)
        if source not in config.sources:
            known = ", ".join(config.sources)
            problems.append(problem(loc, f"unknown source {source} (sources: {known})"))
        elif source not in used:
            why = f"no call of {endpoint.path} uses source {source}: "
            why += "this script can never be consumed"
            problems.append(problem(loc, why))
        else:
            script = _script(source, _kind(config, source), entry, loc, problem, problems)
            if script is not None:
                scripts[source] = script
    for source in sorted(used - scripts.keys()):
        scripts[source] = Script(source, _kind(config, source), (), repeat=False)
    return scripts


def _script(
    source: str,
    kind: Literal["http", "sql"],
    entry: Any,
    loc: Loc,
    problem: Callable[[Loc, str], Problem],
    problems: list[Problem],
) -> Script | None:
    model: type[HttpAnswer] | type[SqlAnswer] = SqlAnswer if kind == "sql" else HttpAnswer
    items = entry if isinstance(entry, list) else [entry]
    answers: list[Answer] = []
    for j, item in enumerate(items):
        at = (*loc, j) if isinstance(entry, list) else loc
        try:
            answers.append(model.model_validate(item))
        except ValidationError as exc:
            found = _located(exc, at, problem)
            # `json` on a sql source, `rows` on an http one: say what the source is.
            found = [
                Problem(p.file, p.line, p.path, f"{p.message} ({source} is a {kind} source)")
                if p.message == "unknown field"
                else p
                for p in found
            ]
            problems.extend(found)
    if len(answers) != len(items):
        return None
    return Script(source, kind, tuple(answers), repeat=not isinstance(entry, list))


def _kind(config: GatewayConfig, source: str) -> Literal["http", "sql"]:
    return "sql" if kind_of(config.sources[source]).kind == "sql" else "http"


def _sources_used(endpoint: EndpointConfig, config: GatewayConfig) -> set[str]:
    """Return the sources the endpoint's calls use, and for a listing its item endpoint's."""
    used = {c.source for c in endpoint.calls.values()}
    if endpoint.listing is not None:
        for e in config.endpoints:
            if e.path == endpoint.listing.item:
                used |= {c.source for c in e.calls.values()}
    return used


def _located(
    exc: ValidationError, prefix: Loc, problem: Callable[[Loc, str], Problem]
) -> list[Problem]:
    found = []
    for e in exc.errors(include_input=False, include_url=False):
        loc = (*prefix, *(p for p in e["loc"] if not _is_label(p)))
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        found.append(problem(loc, msg))
    return found


def _is_label(part: str | int) -> bool:
    # pydantic names the member of a union it tried (`str`, `int`, `function-after[...]`).
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _as_is(value: Any, loc: Loc, line: int) -> Any:
    return value


ENV_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-[^}]*\}")
"""A `${NAME:-default}` reference in a config: contracts resolve it with its default."""


class DefaultsFirst(Mapping[str, str]):
    """The environment for a config under test: a variable that has a default in the text takes
    it (so contracts never depend on where they run); any other is read from `env`."""

    def __init__(self, text: str, env: Mapping[str, str]) -> None:
        self._defaulted = frozenset(m.group(1) for m in ENV_DEFAULT.finditer(text))
        self._env = env

    def __getitem__(self, name: str) -> str:
        if name in self._defaulted:
            raise KeyError(name)
        return self._env[name]

    def __iter__(self) -> Any:
        return (k for k in self._env if k not in self._defaulted)

    def __len__(self) -> int:
        return sum(1 for _ in self)
