"""Source kinds: each kind's settings model, and the table that maps `kind` (and, for SQL, the
DSN scheme) to how a source compiles, opens, renders its calls (`gateway.config.calls`) and
shapes the cache digest.

Pydantic lives here, at the config boundary: a kind's `compile` turns its model into the small
frozen settings value its adapter takes, so nothing in `upstreams/` sees a config model. The kinds'
models stay beside the table because a SQL source's DSN is checked against the table's rows; what
every kind shares (timeouts, retry, breaker, hedge) is in `gateway.config.sources`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config import calls
from gateway.config.calls import BatchRender, BatchSpec, CallSpec, Render
from gateway.config.fieldpath import Loc
from gateway.config.sources import Model, SourceModel
from gateway.core.types import Upstream
from upstreams import mysql, sqlite
from upstreams import postgresql as pg
from upstreams.http import (
    HTTPX_MISSING,
    HttpPoolSettings,
    HttpSettings,
    Propagation,
    http_source,
    httpx_installed,
)
from upstreams.sql import SqlPoolSettings, SqlSettings


class HttpPool(Model):
    """Keep-alive connection pool limits of an HTTP source."""

    max: Annotated[int, Field(ge=1, le=10_000)] = 100
    """The most connections open to the upstream at once."""
    keepalive_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """How long an idle connection is kept open, in seconds."""


class SqlPool(Model):
    """Connection pool limits of a SQL source."""

    min: Annotated[int, Field(ge=0, le=1000)] = 1
    """Connections the pool opens when it starts (MySQL and PostgreSQL)."""
    max: Annotated[int, Field(ge=1, le=1000)] = 10
    """The most connections open at once (SQLite: at most 4)."""
    recycle_s: Annotated[int, Field(ge=1)] = 3600
    """A connection this many seconds old (or idle, on PostgreSQL) is replaced."""

    @model_validator(mode="after")
    def _min_le_max(self) -> SqlPool:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class HttpSourceConfig(SourceModel):
    """An HTTP/JSON upstream service."""

    kind: Literal["http"] = Field(examples=["http"])
    """`http`: an HTTP/JSON upstream service."""
    base_url: str = Field(examples=["http://127.0.0.1:9101", "${PRICING_URL}"])
    """The upstream's address, `http(s)://host[:port][/prefix]` with no query; each call's path
    is appended to it."""
    client: Literal["aiohttp", "httpx"] = "aiohttp"
    """`aiohttp` (a fast keep-alive pool) or `httpx` (which allows `http2: true`)."""
    http2: bool = False
    """Whether calls speak HTTP/2 (needs `client: httpx`)."""
    headers: dict[str, str] = Field(
        default_factory=dict, examples=[{"Authorization": "Bearer ${PRICING_TOKEN}"}]
    )
    """Headers sent on every call; their values are secrets, never logged or shown."""
    max_bytes: Annotated[int, Field(ge=1)] = 1_048_576
    """A larger body (counted as decoded) is that call's `error`."""
    pool: HttpPool = Field(default=HttpPool(), examples=[{"max": 100, "keepalive_s": 30}])
    """The keep-alive connection pool."""

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
        if self.client == "httpx" and not httpx_installed():
            raise ValueError(HTTPX_MISSING)
        return self


class SqlSourceConfig(SourceModel):
    """A SQL database, by its DSN's scheme: one of the `sql` rows of `KINDS`."""

    kind: Literal["sql"] = Field(examples=["sql"])
    """`sql`: a database, of the DSN's scheme."""
    dsn: str = Field(examples=["mysql://root@127.0.0.1:3306/catalog", "${CATALOG_DSN}"])
    """The database: `mysql://user:pass@host:port/db`, `postgresql://user:pass@host:port/db` or
    `sqlite:///path.db`."""
    pool: SqlPool = Field(default=SqlPool(), examples=[{"min": 2, "max": 20}])
    """The connection pool."""
    hedge: None = None
    """Not for sql sources: a hedged query would run twice on the database just when it is
    slow."""

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
    render_batch: Callable[[BatchSpec, str], BatchRender]
    """(a call's `batch:` block, the item endpoint's parameter) -> its batch renderer."""
    check_batch: Callable[[Loc, BatchSpec, str], list[tuple[Loc, str]]]
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
    translate: Callable[[str], tuple[str, Sequence[str]]] = calls.keep_pyformat,
) -> Kind:
    """Return the row of one SQL database: a DSN scheme, its adapter and placeholder syntax."""
    render = partial(calls.sql_render, translate)
    return Kind(
        "sql",
        scheme,
        example,
        SqlSourceConfig,
        _sql_settings,
        open,
        render,
        calls.sql_texts,
        calls.check_sql_call,
        partial(calls.sql_batch_render, translate),
        calls.check_sql_batch,
        _sql_shape,
        check_dsn,
    )


_HTTP = Kind(
    "http",
    "",
    "http://",
    HttpSourceConfig,
    _http_settings,
    http_source,
    calls.http_render,
    calls.http_texts,
    calls.check_http_call,
    calls.http_batch_render,
    calls.check_http_batch,
    _http_shape,
    forwards_headers=True,
)

KINDS: Mapping[tuple[str, str], Kind] = {
    (k.kind, k.scheme): k
    for k in (
        _HTTP,
        _sql_kind("mysql", "mysql://", mysql.mysql_source, _mysql_dsn),
        _sql_kind("sqlite", "sqlite:///", sqlite.sqlite_source, _sqlite_dsn),
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
