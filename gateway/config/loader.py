"""gateway.yaml: typed, frozen config models, and the loader that locates every problem by line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gateway.config.kinds import KIND_NAMES, Millis, SourceConfig, kind_of
from gateway.config.kinds import BreakerConfig as BreakerConfig
from gateway.config.kinds import HedgeConfig as HedgeConfig
from gateway.config.kinds import HttpPool as HttpPool
from gateway.config.kinds import HttpSourceConfig as HttpSourceConfig
from gateway.config.kinds import Model as _Model
from gateway.config.kinds import RetryConfig as RetryConfig
from gateway.config.kinds import SqlPool as SqlPool
from gateway.config.kinds import SqlSourceConfig as SqlSourceConfig
from gateway.core import templates
from gateway.core.errors import ConfigError, Problem

Seconds = Annotated[int, Field(ge=0, le=30 * 86400)]


class PropagationConfig(_Model):
    """The headers that carry the request id and the remaining budget to HTTP upstreams."""

    request_id_header: str = "X-Request-ID"
    deadline_header: str = "X-Request-Deadline-Ms"

    @field_validator("request_id_header", "deadline_header")
    @classmethod
    def _header_name(cls, v: str) -> str:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", v):
            raise ValueError(f"{v!r} is not a valid HTTP header name")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> PropagationConfig:
        if self.request_id_header.lower() == self.deadline_header.lower():
            raise ValueError("request_id_header and deadline_header must be different headers")
        return self


HeaderName = Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", max_length=100)]
"""An HTTP header name (RFC 9110 token)."""


class CallConfig(_Model):
    """One call of an endpoint: which source, what to ask, and what to do when it fails."""

    source: str
    path: str | None = None
    query: str | dict[str, str] | None = None
    args: dict[str, str] = Field(default_factory=dict)
    one: bool = False
    required: bool = False
    fallback: Any = None
    select: tuple[str, ...] | None = None
    timeout_ms: Millis | None = None
    forward_headers: tuple[HeaderName, ...] = ()

    @property
    def has_fallback(self) -> bool:
        return "fallback" in self.model_fields_set

    @property
    def omit(self) -> bool:
        return self.fallback == "omit"


class EndpointCache(_Model):
    """How long composite answers of one endpoint are kept."""

    ttl_s: Seconds = 60
    partial_ttl_s: Seconds = 0
    stale_while_revalidate_s: Seconds = 0
    stale_if_error_s: Seconds = 0
    not_found_ttl_s: Seconds = 30
    allow_client_bypass: bool = False
    tags: tuple[str, ...] = ()
    vary: tuple[HeaderName, ...] = ()


class EndpointConfig(_Model):
    """One aggregated endpoint: a path, a deadline, calls, and its cache."""

    path: str
    deadline_ms: Millis = 1000
    cache: EndpointCache | None = None
    calls: dict[str, CallConfig]

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        names = [name for name, _ in templates.path_params(v)]
        if len(set(names)) < len(names):
            raise ValueError("a path parameter name appears twice")
        for name, kind in templates.path_params(v):
            if kind not in PARAM_TYPES:
                raise ValueError(
                    f"parameter {name!r} has unknown type {kind!r}; use one of "
                    f"{', '.join(PARAM_TYPES)}"
                )
        return v

    @field_validator("calls")
    @classmethod
    def _calls(cls, v: dict[str, CallConfig]) -> dict[str, CallConfig]:
        if not v:
            raise ValueError("an endpoint needs at least one call")
        return v


PARAM_TYPES = ("int", "str", "float")


class NearCacheConfig(_Model):
    """An in-process tier in front of Redis for the hottest keys, a few seconds at most."""

    max_entries: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    ttl_s: Annotated[float, Field(gt=0, le=10)] = 1.0


class CacheConfig(_Model):
    """Where composite answers are cached: `redis://`, `redis+cluster://` or `memory://`."""

    url: str = "memory://"
    key_prefix: str = "gw:"
    op_timeout_ms: Millis = 20
    memory_max_entries: Annotated[int, Field(ge=1)] = 10_000
    memory_max_bytes: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024
    compress_min_bytes: Annotated[int, Field(ge=0)] = 4096
    max_entry_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 8 * 1024 * 1024
    near: NearCacheConfig | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("memory", "redis", "rediss", "redis+cluster"):
            raise ValueError("must be memory://, redis://, rediss:// or redis+cluster://")
        return v

    @model_validator(mode="after")
    def _near_needs_redis(self) -> CacheConfig:
        # memory:// is in-process already: a near tier in front of it would do nothing.
        if self.near is not None and urlsplit(self.url).scheme == "memory":
            raise ValueError("near: is a tier in front of Redis; memory:// needs none")
        return self


class ServerConfig(_Model):
    """How `gateway serve` treats client connections, per process: read when it starts."""

    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    header_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    body_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    keepalive_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    drain_s: Annotated[float, Field(ge=0, le=600)] = 10.0


class GatewayConfig(_Model):
    """A whole gateway.yaml, parsed and cross-checked."""

    version: Literal[1] = 1
    cache: CacheConfig = CacheConfig()
    propagation: PropagationConfig = PropagationConfig()
    server: ServerConfig = ServerConfig()
    sources: dict[str, SourceConfig]
    endpoints: list[EndpointConfig]


# --- loading -------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.I)

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with where it came from, what it was made of, and its secrets."""

    config: GatewayConfig
    file: str
    text: str
    secrets: frozenset[str]

    def redacted(self) -> dict[str, Any]:
        """Return the effective config as plain data with every secret value replaced: every
        source header value and every call query value but a pure template, wholly; URL and DSN
        passwords and every other secret wherever they appear."""
        data = self.config.model_dump(mode="json")
        for source in data.get("sources", {}).values():
            if isinstance(source.get("headers"), dict):
                source["headers"] = {k: _masked(v) for k, v in source["headers"].items()}
        for endpoint in data.get("endpoints", []):
            for call in endpoint.get("calls", {}).values():
                if isinstance(call.get("query"), dict):
                    call["query"] = {
                        k: v if _pure_template(v) else "***" for k, v in call["query"].items()
                    }
        return _redact(data, self.secrets)


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
    lines: dict[Loc, int] = {}
    problems: list[Problem] = []
    secrets: set[str] = set()
    try:
        data = _build(node, (), lines, env, file, problems, secrets)
    except _TooLarge as exc:
        raise ConfigError([exc.problem]) from None
    if problems:
        raise ConfigError(_redact_problems(problems, secrets))
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
            found.append(Problem(file, _line_of(lines, loc), _dotted(loc), _message(e)))
        raise ConfigError(_redact_problems(found, secrets)) from None
    problems = [
        Problem(file, _line_of(lines, loc), _dotted(loc), msg) for loc, msg in cross_check(config)
    ]
    if problems:
        raise ConfigError(_redact_problems(problems, secrets))
    return LoadedConfig(config, file, text, frozenset(s for s in secrets if s))


def _build(
    node: yaml.Node,
    loc: Loc,
    lines: dict[Loc, int],
    env: Mapping[str, str],
    file: str,
    problems: list[Problem],
    secrets: set[str],
) -> Any:
    lines[loc] = node.start_mark.line + 1
    if len(loc) > _MAX_DEPTH or len(lines) > _MAX_NODES:
        # Aliases are expanded: a recursive one or an alias bomb would never end.
        what = "nested too deeply" if len(loc) > _MAX_DEPTH else "too large once aliases expand"
        raise _TooLarge(Problem(file, lines[loc], _dotted(loc[:8]), what))
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                why = "merge keys (<<) are not supported" if key_node.tag == _MERGE else ""
                line = key_node.start_mark.line + 1
                problems.append(Problem(file, line, _dotted(loc), why or "keys must be names"))
                continue
            # Keys are names: YAML 1.1 would read `on:` (retry.on) as the boolean true.
            key = key_node.value
            if key in out:
                problems.append(
                    Problem(
                        file, key_node.start_mark.line + 1, _dotted((*loc, key)), "duplicate key"
                    )
                )
            lines[(*loc, key)] = key_node.start_mark.line + 1
            out[key] = _build(value_node, (*loc, key), lines, env, file, problems, secrets)
            lines[(*loc, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(n, (*loc, i), lines, env, file, problems, secrets)
            for i, n in enumerate(node.value)
        ]
    try:
        value = yaml.SafeLoader(b"").construct_object(node)
    except (yaml.YAMLError, ValueError) as exc:  # an unknown !tag, an int of 5000 digits
        msg = (getattr(exc, "problem", None) or str(exc)).splitlines()[0]
        problems.append(Problem(file, lines[loc], _dotted(loc), f"invalid value: {msg}"))
        return None
    if isinstance(value, str) and "${" in value:
        value = _interpolate(value, loc, env, file, node.start_mark.line + 1, problems, secrets)
    if isinstance(value, str):
        secrets.update(_literal_secrets(value, loc))
    return value


def _literal_secrets(value: str, loc: Loc) -> set[str]:
    """Return what in a config value is secret whatever its origin (`${VAR}` or written as is):
    a source header's value (and its credential after `Bearer `), an http call query value's
    literal text, and a URL's or DSN's password."""
    found: set[str] = set()
    if len(loc) == 4 and loc[0] == "sources" and loc[2] == "headers":
        found.update((value, value.partition(" ")[2].strip()))
    if len(loc) == 6 and loc[0] == "endpoints" and loc[2] == "calls" and loc[4] == "query":
        found.update(p.strip() for p in templates.parse(value).parts if isinstance(p, str))
    try:
        password = urlsplit(value).password
    except ValueError:  # not a URL at all ("http://[::1")
        password = None
    if password:
        found.update((password, unquote(password)))
    return {s for s in found if s}


_AUTH_SCHEMES = frozenset({"basic", "bearer", "digest", "token", "apikey"})


def _masked(value: Any) -> str:
    """Return `***` for a header value, keeping a known auth scheme (`Bearer ***`) in sight."""
    scheme, _, credential = str(value).partition(" ")
    return f"{scheme} ***" if scheme.lower() in _AUTH_SCHEMES and credential else "***"


def _pure_template(value: Any) -> bool:
    """Whether a query value is references only (`{product.category}`): nothing of it is secret."""
    if not isinstance(value, str) or not value:
        return False
    return all(isinstance(p, templates.Ref) for p in templates.parse(value).parts)


def _interpolate(
    value: str,
    loc: Loc,
    env: Mapping[str, str],
    file: str,
    line: int,
    problems: list[Problem],
    secrets: set[str],
) -> str:
    secret_field = any(isinstance(p, str) and _SECRET_NAME.search(p) for p in loc) or (
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
                        _dotted(loc),
                        f"environment variable {name} is not set and has no default",
                    )
                )
                return ""
            found = default
        if _SECRET_NAME.search(name) or secret_field:
            secrets.add(found)
        return found

    result = _ENV.sub(sub, value)
    if "${" in _ENV.sub("", value):
        problems.append(
            Problem(file, line, _dotted(loc), "malformed ${NAME} or ${NAME:-default} reference")
        )
    return result


def _redact_problems(problems: list[Problem], secrets: set[str]) -> list[Problem]:
    """Return `problems` with every secret of the file out of their messages: `gateway check`
    and a refused reload print them."""
    frozen = frozenset(secrets)
    return [
        Problem(p.file, p.line, redact_text(p.path, frozen), redact_text(p.message, frozen))
        for p in problems
    ]


def _redact(data: Any, secrets: frozenset[str]) -> Any:
    if isinstance(data, dict):
        return {k: _redact(v, secrets) for k, v in data.items()}
    if isinstance(data, list):
        return [_redact(v, secrets) for v in data]
    if isinstance(data, str):
        return redact_text(data, secrets)
    return data


def redact_text(text: str, secrets: frozenset[str]) -> str:
    """Return `text` with every secret value (and any URL password) replaced by `***`."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]+@", r"\1***@", text)


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


def _line_of(lines: Mapping[Loc, int], loc: Loc) -> int:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), 1)


def _dotted(loc: Loc) -> str:
    return ".".join(_part(p) for p in loc) if loc else "(top)"


def _part(p: str | int) -> str:
    # A key that is empty or holds spaces, newlines or other unprintables is quoted and escaped,
    # so that a problem stays one line, its path one word, and the key visible.
    text = str(p)
    if text and text.isprintable() and not any(c.isspace() for c in text):
        return text
    return repr(text).replace(" ", "\\x20")


# --- cross-checks --------------------------------------------------------------------------


RESERVED_PATHS = frozenset(
    {"/admin", "/metrics", "/healthz", "/readyz", "/docs", "/redoc", "/openapi.json"}
)
"""First path segments the gateway serves itself; an endpoint there would be shadowed or shadow."""


def cross_check(config: GatewayConfig) -> list[tuple[Loc, str]]:
    """Return every problem that single fields cannot show: names, cycles, templates, budgets."""
    found: list[tuple[Loc, str]] = _check_hedges(config)
    for name in config.sources:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
            found.append((("sources", name), "a source name is letters, digits, _ and -"))
    seen_paths: dict[str, int] = {}
    for i, ep in enumerate(config.endpoints):
        at: Loc = ("endpoints", i)
        shape = templates.starlette_path(ep.path)
        shape = re.sub(r"\{[^}]*\}", "{}", shape)
        if shape in seen_paths:
            found.append(((*at, "path"), f"duplicate path: same as endpoints.{seen_paths[shape]}"))
        seen_paths.setdefault(shape, i)
        first = "/" + ep.path.split("/")[1] if ep.path != "/" else "/"
        if first in RESERVED_PATHS:
            found.append(
                (
                    (*at, "path"),
                    f"{first} belongs to the gateway itself (reserved: "
                    f"{', '.join(sorted(RESERVED_PATHS))})",
                )
            )
        params = {name for name, _ in templates.path_params(ep.path)}
        deps: dict[str, set[str]] = {}
        for name, call in ep.calls.items():
            cat: Loc = (*at, "calls", name)
            deps[name] = set()
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                found.append((cat, f"call name {name!r} must be an identifier not starting with _"))
            source = config.sources.get(call.source)
            if source is None:
                known = ", ".join(_part(n) for n in sorted(config.sources)) or "none"
                found.append(((*cat, "source"), f"unknown source {call.source!r} (known: {known})"))
            for field, texts in _call_templates(call):
                for text in texts:
                    for ref in templates.parse(text).refs:
                        if ref.root in params and not ref.attrs:
                            continue
                        if ref.root in ep.calls and ref.root != name:
                            deps[name].add(ref.root)
                            continue
                        found.append(
                            (
                                (*cat, field),
                                f"template {{{ref.text}}} names no path parameter or call"
                                f" (parameters: {', '.join(sorted(params)) or 'none'})",
                            )
                        )
            if source is not None:
                found += kind_of(source).check_call(cat, call, params)
            found += _check_forwarding(cat, call, source, ep.cache)
            if call.required and call.has_fallback:
                found.append(((*cat, "fallback"), "a required call cannot have a fallback"))
            timeout = call.timeout_ms or (source.timeout_ms if source else 0)
            if timeout > ep.deadline_ms:
                where = "timeout_ms" if call.timeout_ms else "source"
                found.append(
                    (
                        (*cat, where),
                        f"timeout {timeout} ms is longer than the endpoint's "
                        f"deadline_ms {ep.deadline_ms}",
                    )
                )
        for name in _cycle(deps):
            found.append(
                (
                    (*at, "calls", name),
                    "calls wait for each other in a cycle: " + " -> ".join(_cycle(deps)),
                )
            )
            break
        if ep.cache:
            for j, tag in enumerate(ep.cache.tags):
                for ref in templates.parse(tag).refs:
                    if ref.root not in params or ref.attrs:
                        found.append(
                            (
                                (*at, "cache", "tags", j),
                                f"tag template {{{ref.text}}} names no path parameter",
                            )
                        )
            if ep.cache.partial_ttl_s > ep.cache.ttl_s:
                found.append(((*at, "cache", "partial_ttl_s"), "is longer than ttl_s"))
    return found


def _check_hedges(config: GatewayConfig) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    for name, source in config.sources.items():
        hedge = source.hedge
        if hedge is not None and hedge.after_ms is not None and hedge.after_ms >= source.timeout_ms:
            found.append(
                (
                    ("sources", name, "hedge", "after_ms"),
                    f"{hedge.after_ms} ms is not shorter than timeout_ms ({source.timeout_ms}): "
                    "the first request times out before a hedge would be sent",
                )
            )
    return found


def _check_forwarding(
    cat: Loc, call: CallConfig, source: SourceConfig | None, cache: EndpointCache | None
) -> list[tuple[Loc, str]]:
    """A forwarded request header shapes the answer: a cached endpoint must vary by it."""
    if not call.forward_headers:
        return []
    if source is not None and not kind_of(source).forwards_headers:
        return [((*cat, "forward_headers"), "only http calls forward request headers")]
    varied = {h.lower() for h in (cache.vary if cache else ())}
    missing = [h for h in call.forward_headers if cache is not None and h.lower() not in varied]
    if missing:
        return [
            (
                (*cat, "forward_headers"),
                f"forwards {', '.join(missing)} but the endpoint's "
                "cache key does not include it: add it to cache.vary (or the answer for one "
                "client would be served to another)",
            )
        ]
    return []


def _call_templates(call: CallConfig) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    if call.path:
        out.append(("path", [call.path]))
    if isinstance(call.query, dict):
        out.append(("query", list(call.query.values())))
    if call.args:
        out.append(("args", list(call.args.values())))
    return out


def _cycle(deps: Mapping[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for d in sorted(deps.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return []

    for n in deps:
        if n not in state and (found := visit(n)):
            return found
    return []
