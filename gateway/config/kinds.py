"""Source kinds: each kind's settings model, and the table that maps `kind` (and, for SQL, the
DSN scheme) to how a source compiles, opens, renders its calls and shapes the cache digest.

Pydantic lives here, at the config boundary: a kind's `compile` turns its model into the small
frozen settings value its adapter takes, so nothing in `upstreams/` sees a config model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.core import templates
from gateway.core.types import Upstream
from upstreams import postgresql as pg
from upstreams.http import HttpPoolSettings, HttpSettings, Propagation, http_source
from upstreams.sql import SqlPoolSettings, SqlSettings, mysql_source, sqlite_source


class Model(BaseModel):
    """A config model: unknown keys are errors, and a parsed value never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Millis = Annotated[int, Field(gt=0, le=3_600_000)]

RetryOn = Literal["timeout", "connect", "error", 500, 502, 503, 504, 429]


class RetryConfig(Model):
    """Retries of one source's idempotent calls, bounded by the deadline and a budget."""

    attempts: Annotated[int, Field(ge=1, le=10)] = 2
    backoff_ms: Annotated[int, Field(ge=0, le=60_000)] = 10
    max_backoff_ms: Annotated[int, Field(ge=0, le=60_000)] = 200
    jitter: bool = True
    on: tuple[RetryOn, ...] = ("timeout", "connect", 502, 503, 504)
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2


class BreakerConfig(Model):
    """A circuit breaker on one source's failure ratio over a sliding window."""

    failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_calls: Annotated[int, Field(ge=1)] = 20
    window_s: Annotated[int, Field(ge=1, le=3600)] = 10
    open_ms: Millis = 5000
    half_open_calls: Annotated[int, Field(ge=1, le=100)] = 1


HedgePercentile = Literal["p50", "p75", "p90", "p95", "p99"]


class HedgeConfig(Model):
    """Hedged requests of an HTTP source: a second request once the first is late.

    Late means after a fixed `after_ms`, or after the source's live latency percentile `after`.
    """

    after_ms: Millis | None = None
    after: HedgePercentile | None = None

    @model_validator(mode="after")
    def _one_delay(self) -> HedgeConfig:
        if (self.after_ms is None) == (self.after is None):
            raise ValueError(
                "give exactly one of after_ms (a fixed delay) or after (a live latency "
                "percentile: p50, p75, p90, p95 or p99)"
            )
        return self

    @property
    def quantile(self) -> float | None:
        """The percentile of `after` as a fraction (p95 -> 0.95), or None for a fixed delay."""
        return int(self.after[1:]) / 100 if self.after else None


class HttpPool(Model):
    """Keep-alive connection pool limits of an HTTP source."""

    max: Annotated[int, Field(ge=1, le=10_000)] = 100
    keepalive_s: Annotated[float, Field(gt=0, le=3600)] = 30.0


class SqlPool(Model):
    """Connection pool limits of a SQL source."""

    min: Annotated[int, Field(ge=0, le=1000)] = 1
    max: Annotated[int, Field(ge=1, le=1000)] = 10
    recycle_s: Annotated[int, Field(ge=1)] = 3600

    @model_validator(mode="after")
    def _min_le_max(self) -> SqlPool:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class SourceModel(Model):
    """What every source kind has: a timeout and the optional policies around its calls."""

    kind: str
    timeout_ms: Millis = 1000
    retry: RetryConfig | None = None
    breaker: BreakerConfig | None = None
    max_in_flight: Annotated[int, Field(ge=1)] | None = None
    hedge: HedgeConfig | None = None

    @property
    def scheme(self) -> str:
        """The second half of this source's key in `KINDS` (a DSN's scheme; empty for http)."""
        return ""


class HttpSourceConfig(SourceModel):
    """An HTTP/JSON upstream service."""

    kind: Literal["http"]
    base_url: str
    client: Literal["aiohttp", "httpx"] = "aiohttp"
    http2: bool = False
    headers: dict[str, str] = Field(default_factory=dict)
    max_bytes: Annotated[int, Field(ge=1)] = 1_048_576
    pool: HttpPool = HttpPool()

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _http2_needs_httpx(self) -> HttpSourceConfig:
        if self.http2 and self.client != "httpx":
            raise ValueError("http2: true needs client: httpx")
        return self


class SqlSourceConfig(SourceModel):
    """A SQL database, by its DSN's scheme: one of the `sql` rows of `KINDS`."""

    kind: Literal["sql"]
    dsn: str
    pool: SqlPool = SqlPool()
    hedge: None = None

    @field_validator("hedge", mode="before")
    @classmethod
    def _no_hedge(cls, v: Any) -> None:
        if v is not None:
            raise ValueError(
                "hedging is for http sources only: a hedged SQL query runs twice on the "
                "database and doubles its load exactly when it is slow"
            )
        return None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        entry = KINDS.get(("sql", urlsplit(v).scheme))
        if entry is None:
            raise ValueError(
                "must start with " + " or ".join(k.example for k in KINDS.values() if k.dsn)
            )
        problem = entry.check_dsn(v) if entry.check_dsn else None
        if problem:
            raise ValueError(problem)
        return v

    @property
    def scheme(self) -> str:
        return urlsplit(self.dsn).scheme


# --- how calls render, per family of kinds ---------------------------------------------------

Scope = Mapping[str, Any]
Render = Callable[[Scope], tuple[str, Mapping[str, Any]]]
Loc = tuple[str | int, ...]


class CallSpec(Protocol):
    """The fields of a call's config that its source kind reads."""

    @property
    def path(self) -> str | None: ...
    @property
    def query(self) -> str | Mapping[str, str] | None: ...
    @property
    def args(self) -> Mapping[str, str]: ...
    @property
    def one(self) -> bool: ...


def _http_render(call: CallSpec) -> Render:
    path = templates.parse(call.path or "/")
    query = (
        [(k, templates.parse(v)) for k, v in call.query.items()]
        if isinstance(call.query, Mapping)
        else []
    )
    if not query and not path.refs:
        fixed = path.render_path({})
        return lambda scope: (fixed, {})

    def render(scope: Scope) -> tuple[str, Mapping[str, Any]]:
        return path.render_path(scope), {k: t.render_value(scope) for k, t in query}

    return render


def _http_texts(call: CallSpec) -> list[str]:
    return [call.path or "", *(call.query.values() if isinstance(call.query, Mapping) else ())]


def _check_http_call(cat: Loc, call: CallSpec, params: set[str]) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    if call.path is None:
        found.append(((*cat, "path"), "an http call needs a path"))
    elif not call.path.startswith("/"):
        found.append(((*cat, "path"), "must start with /"))
    if isinstance(call.query, str):
        found.append(((*cat, "query"), "an http call's query is a mapping of values"))
    if call.one or call.args:
        found.append(((*cat, "one" if call.one else "args"), "only sql calls take one and args"))
    return found


def _keep_pyformat(sql: str) -> tuple[str, tuple[str, ...]]:
    return sql, tuple(templates.sql_param_names(sql))


def _sql_render(translate: Callable[[str], tuple[str, Sequence[str]]], call: CallSpec) -> Render:
    """Return the renderer of a SQL call: its text in the driver's placeholder syntax (made
    once, here) and its parameters by name, in the order the translated text binds them."""
    sql, names = translate(call.query if isinstance(call.query, str) else "")
    args = {k: templates.parse(v) for k, v in call.args.items()}

    def render(scope: Scope) -> tuple[str, Mapping[str, Any]]:
        return sql, {n: args[n].render_value(scope) if n in args else scope[n] for n in names}

    return render


def _sql_texts(call: CallSpec) -> list[str]:
    return list(call.args.values())


def _check_sql_call(cat: Loc, call: CallSpec, params: set[str]) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    if not isinstance(call.query, str):
        return [((*cat, "query"), "a sql call needs a query string")]
    if call.path is not None:
        found.append(((*cat, "path"), "a sql call takes a query, not a path"))
    for placeholder in templates.sql_param_names(call.query):
        if placeholder not in params and placeholder not in call.args:
            found.append(
                (
                    (*cat, "query"),
                    f"placeholder %({placeholder})s names no path parameter and no entry of args",
                )
            )
    if "{" in call.query and templates.parse(call.query).refs:
        found.append(
            ((*cat, "query"), "SQL text cannot hold templates; bind values with %(name)s and args")
        )
    return found


# --- compiling models to adapter settings ----------------------------------------------------


def _http_settings(cfg: Any, propagation: Propagation) -> HttpSettings:
    return HttpSettings(
        base_url=cfg.base_url,
        client=cfg.client,
        http2=cfg.http2,
        headers=tuple(cfg.headers.items()),
        max_bytes=cfg.max_bytes,
        pool=HttpPoolSettings(max=cfg.pool.max, keepalive_s=cfg.pool.keepalive_s),
        propagation=propagation,
    )


def _sql_settings(cfg: Any, propagation: Propagation) -> SqlSettings:
    pool = SqlPoolSettings(min=cfg.pool.min, max=cfg.pool.max, recycle_s=cfg.pool.recycle_s)
    return SqlSettings(dsn=cfg.dsn, pool=pool)


def _open_http(name: str, settings: Any) -> Awaitable[Upstream]:
    return http_source(name, settings, settings.propagation)


def _http_shape(cfg: Any) -> Any:
    # The answer's shape depends on where data comes from, not on how patiently we wait for it.
    return {"kind": "http", "base_url": cfg.base_url}


def _sql_shape(cfg: Any) -> Any:
    return {"kind": "sql", "dsn": cfg.dsn}


def _mysql_dsn(dsn: str) -> str | None:
    return None if urlsplit(dsn).hostname else "a mysql:// DSN needs a host"


def _sqlite_dsn(dsn: str) -> str | None:
    return None if dsn.startswith("sqlite:///") else "a sqlite DSN is sqlite:///path/to/file.db"


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of source: its config model, and how it compiles, opens, renders and shapes."""

    kind: str
    scheme: str
    """The DSN scheme this row serves (`mysql`, `postgresql`...); empty where there is no DSN."""
    example: str
    """How its address starts, for error messages."""
    model: type[SourceModel]
    compile: Callable[[Any, Propagation], Any]
    """Model -> the frozen settings value the adapter takes."""
    open: Callable[[str, Any], Awaitable[Upstream]]
    """(name, settings) -> the started source."""
    render: Callable[[CallSpec], Render]
    """A call's config -> its renderer, built once when the config loads."""
    texts: Callable[[CallSpec], list[str]]
    """The templates of a call, whose references to other calls make it wait for them."""
    check_call: Callable[[Loc, CallSpec, set[str]], list[tuple[Loc, str]]]
    shape: Callable[[Any], Any]
    """Model -> what of it shapes the answer, for the endpoint's cache digest."""
    check_dsn: Callable[[str], str | None] | None = None
    forwards_headers: bool = False

    @property
    def dsn(self) -> bool:
        return bool(self.scheme)


def _sql_kind(
    scheme: str,
    example: str,
    open: Callable[[str, Any], Awaitable[Upstream]],
    check_dsn: Callable[[str], str | None],
    translate: Callable[[str], tuple[str, Sequence[str]]] = _keep_pyformat,
) -> Kind:
    """Return the row of one SQL database: a DSN scheme, its adapter and placeholder syntax."""
    render = partial(_sql_render, translate)
    return Kind(
        "sql",
        scheme,
        example,
        SqlSourceConfig,
        _sql_settings,
        open,
        render,
        _sql_texts,
        _check_sql_call,
        _sql_shape,
        check_dsn,
    )


_HTTP = Kind(
    "http",
    "",
    "http://",
    HttpSourceConfig,
    _http_settings,
    _open_http,
    _http_render,
    _http_texts,
    _check_http_call,
    _http_shape,
    forwards_headers=True,
)

KINDS: Mapping[tuple[str, str], Kind] = {
    (k.kind, k.scheme): k
    for k in (
        _HTTP,
        _sql_kind("mysql", "mysql://", mysql_source, _mysql_dsn),
        _sql_kind("sqlite", "sqlite:///", sqlite_source, _sqlite_dsn),
        _sql_kind("postgresql", "postgresql://", pg.postgresql_source, pg.check_dsn, pg.positional),
    )
}
"""Every source kind the gateway knows, by (kind, DSN scheme)."""

KIND_NAMES: tuple[str, ...] = tuple(dict.fromkeys(k for k, _ in KINDS))
"""The values `kind:` may take."""


def kind_of(source: SourceModel) -> Kind:
    """Return the table row of a validated source (its kind and scheme were checked)."""
    return KINDS[(source.kind, source.scheme)]


_MODELS = tuple(dict.fromkeys(k.model for k in KINDS.values()))

if TYPE_CHECKING:
    SourceConfig = SourceModel
else:
    SourceConfig = Annotated[Union[_MODELS], Field(discriminator="kind")]  # noqa: UP007
"""Any source's config, told apart by `kind`: the union of the table's models."""
