"""gateway.yaml loading: YAML read with a line for every field, `${VAR}` interpolated, then
validated into the schema and cross-checked, every problem located by line and field path."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.checks import cross_check
from gateway.config.fieldpath import Loc, dotted
from gateway.config.jsonschema import INTERPOLATION
from gateway.config.kinds import KIND_NAMES
from gateway.config.redact import SECRET_NAME, literal_secrets, redact_problems, redacted
from gateway.config.schema import GatewayConfig
from gateway.core.errors import ConfigError, Problem

_ENV = re.compile(INTERPOLATION)


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with where it came from, what it was made of, and its secrets."""

    config: GatewayConfig
    file: str
    text: str
    secrets: frozenset[str]
    lines: Mapping[Loc, int] = field(default_factory=dict, compare=False, repr=False)
    """The line of every value of the file, by its place (for problems found after loading)."""

    def redacted(self) -> dict[str, Any]:
        """Return the effective config as plain data with every secret value replaced."""
        return redacted(self.config.model_dump(mode="json", by_alias=True), self.secrets)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, interpolate and validate a config file; raise `ConfigError` listing every problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, 0, "(file)", f"cannot read: {exc.strerror}")]) from None
    return loads(text, file, env)


def loads(text: str, file: str = "<string>", env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Validate config text; raise `ConfigError` listing every problem with line and field."""
    env = os.environ if env is None else env
    lines: dict[Loc, int] = {}
    problems: list[Problem] = []
    secrets: set[str] = set()

    def scalar(value: Any, loc: Loc, line: int) -> Any:
        if isinstance(value, str) and "${" in value:
            value = _interpolate(value, loc, env, file, line, problems, secrets)
        if isinstance(value, str):
            secrets.update(literal_secrets(value, loc))
        return value

    data = read_yaml(text, file, lines, problems, scalar)
    if problems:
        raise ConfigError(redact_problems(problems, secrets))
    if not isinstance(data, dict):
        raise ConfigError([Problem(file, 1, "(file)", "the top level must be a mapping")])
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        found = []
        for e in exc.errors(include_input=False, include_url=False):
            loc = _clean_loc(e["loc"], data)
            if e["type"].startswith("union_tag"):
                loc = (*loc, "kind")
            found.append(Problem(file, line_of(lines, loc), dotted(loc), _message(e)))
        raise ConfigError(redact_problems(found, secrets)) from None
    config, found_files = _read_schema_files(config, Path(file).parent)
    problems = [
        Problem(file, line_of(lines, loc), dotted(loc), msg)
        for loc, msg in [*found_files, *cross_check(config)]
    ]
    if problems:
        raise ConfigError(redact_problems(problems, secrets))
    return LoadedConfig(config, file, text, frozenset(s for s in secrets if s), lines)


def untyped_calls(loaded: LoadedConfig) -> list[Problem]:
    """Return one located problem per call that declares no schema (`gateway check --strict`)."""
    return [
        Problem(
            loaded.file,
            line_of(loaded.lines, at),
            dotted(at),
            "declares no schema: its result is untyped ({}) in /openapi.json",
        )
        for i, ep in enumerate(loaded.config.endpoints)
        if ep.listing is None  # a listing's own calls find its ids; they are not in its answer
        for name, call in ep.calls.items()
        if call.schema_ is None
        for at in [("endpoints", i, "calls", name)]
    ]


MAX_SCHEMA_FILE = 1024 * 1024
"""The most bytes a call's `schema_file` may hold."""


def _read_schema_files(
    config: GatewayConfig, base: Path
) -> tuple[GatewayConfig, list[tuple[Loc, str]]]:
    """Return `config` with each call's `schema_file` read into its `schema`, and the problems
    of the files that cannot be read or hold no schema."""
    found: list[tuple[Loc, str]] = []
    endpoints = []
    for i, ep in enumerate(config.endpoints):
        calls = {}
        for name, call in ep.calls.items():
            if call.schema_file is not None:
                where: Loc = ("endpoints", i, "calls", name, "schema_file")
                schema, why = _schema_from(base / call.schema_file)
                if why:
                    found.append((where, f"{call.schema_file}: {why}"))
                call = call.model_copy(update={"schema_": schema})
            calls[name] = call
        endpoints.append(ep.model_copy(update={"calls": calls}))
    return config.model_copy(update={"endpoints": endpoints}), found


def _schema_from(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SCHEMA_FILE + 1)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    if len(raw) > MAX_SCHEMA_FILE:
        return None, f"longer than {MAX_SCHEMA_FILE} bytes"
    try:
        data = yaml.safe_load(raw.decode("utf-8"))  # JSON is YAML too
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        return None, f"not JSON or YAML: {str(exc).splitlines()[0]}"
    if not isinstance(data, dict):
        return None, "a JSON Schema file holds a mapping (an object)"
    return data, ""


Scalar = Callable[[Any, Loc, int], Any]
"""(a scalar's value, its place, its line) -> the value kept."""


def read_yaml(
    text: str, file: str, lines: dict[Loc, int], problems: list[Problem], scalar: Scalar
) -> Any:
    """Return the plain data of a YAML document, noting the line of every value (a key's line
    for a mapping's value) in `lines` and its problems (duplicate keys, merge keys, bad values)
    in `problems`; each scalar passes through `scalar`. Nesting and the expansion of aliases are
    bounded. Raises `ConfigError` for text that is no YAML, empty, or too large."""
    last_line = max(1, len(text.splitlines()))
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        else:  # a ReaderError (a character YAML does not allow) knows only its position
            line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        msg = (getattr(exc, "problem", None) or str(exc)).splitlines()[0]
        line = min(max(line, 1), last_line)
        raise ConfigError([Problem(file, line, "(yaml)", f"invalid YAML: {msg}")]) from None
    except RecursionError:
        raise ConfigError([Problem(file, 1, "(yaml)", "invalid YAML: nested too deeply")]) from None
    if node is None:
        raise ConfigError([Problem(file, 1, "(file)", "the file is empty")])
    try:
        return _build(node, (), lines, file, problems, scalar)
    except _TooLarge as exc:
        raise ConfigError([exc.problem]) from None


def _build(
    node: yaml.Node,
    loc: Loc,
    lines: dict[Loc, int],
    file: str,
    problems: list[Problem],
    scalar: Scalar,
) -> Any:
    lines[loc] = node.start_mark.line + 1
    if len(loc) > _MAX_DEPTH or len(lines) > _MAX_NODES:
        # Aliases are expanded: a recursive one or an alias bomb would never end.
        what = "nested too deeply" if len(loc) > _MAX_DEPTH else "too large once aliases expand"
        raise _TooLarge(Problem(file, lines[loc], dotted(loc[:8]), what))
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                why = "merge keys (<<) are not supported" if key_node.tag == _MERGE else ""
                line = key_node.start_mark.line + 1
                problems.append(Problem(file, line, dotted(loc), why or "keys must be names"))
                continue
            # Keys are names: YAML 1.1 would read `on:` (retry.on) as the boolean true.
            key = key_node.value
            if key in out:
                problems.append(
                    Problem(
                        file, key_node.start_mark.line + 1, dotted((*loc, key)), "duplicate key"
                    )
                )
            out[key] = _build(value_node, (*loc, key), lines, file, problems, scalar)
            lines[(*loc, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(n, (*loc, i), lines, file, problems, scalar) for i, n in enumerate(node.value)
        ]
    try:
        value = yaml.SafeLoader(b"").construct_object(node)
    except (yaml.YAMLError, ValueError) as exc:  # an unknown !tag, an int of 5000 digits
        msg = (getattr(exc, "problem", None) or str(exc)).splitlines()[0]
        problems.append(Problem(file, lines[loc], dotted(loc), f"invalid value: {msg}"))
        return None
    return scalar(value, loc, node.start_mark.line + 1)


def _interpolate(
    value: str,
    loc: Loc,
    env: Mapping[str, str],
    file: str,
    line: int,
    problems: list[Problem],
    secrets: set[str],
) -> str:
    secret_field = any(isinstance(p, str) and SECRET_NAME.search(p) for p in loc) or (
        len(loc) >= 2 and loc[-2] == "headers"
    )

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = env.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                problems.append(
                    Problem(
                        file,
                        line,
                        dotted(loc),
                        f"environment variable {name} is not set and has no default",
                    )
                )
                return ""
            found = default
        if SECRET_NAME.search(name) or secret_field:
            secrets.add(found)
        return found

    result = _ENV.sub(sub, value)
    if "${" in _ENV.sub("", value):
        problems.append(
            Problem(file, line, dotted(loc), "malformed ${NAME} or ${NAME:-default} reference")
        )
    return result


def _clean_loc(loc: tuple[Any, ...], data: Any) -> Loc:
    """Return `loc` without the union member labels pydantic puts in it (`sources.x.http.dsn`,
    `query.dict[str,str]`): a part that is not in the data there and names a type is dropped."""
    out: list[str | int] = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif isinstance(part, str) and (part in _UNION_LABELS or "[" in part):
            continue
        else:
            data = None
        out.append(part)
    return tuple(out)


_UNION_LABELS = frozenset({*KIND_NAMES, "str", "int", "float", "bool", "none"})
_MAX_DEPTH = 40
_MAX_NODES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


class _TooLarge(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


def _message(err: Any) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown field (not part of the config language, or not built yet)"
    if err["type"] == "union_tag_invalid":
        return f"kind must be one of: {', '.join(KIND_NAMES)}"
    if err["type"] == "union_tag_not_found":
        return f"missing field kind ({' or '.join(KIND_NAMES)})"
    return msg.removeprefix("Value error, ")


def line_of(lines: Mapping[Loc, int], loc: Loc) -> int:
    """Return the line of `loc`, or of the nearest enclosing value that has one."""
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), 1)
