"""gateway.yaml's schema: typed, frozen pydantic models of the whole file but its sources, whose
models are the kinds' (`gateway.config.kinds`)."""

from __future__ import annotations

import importlib.util
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config.kinds import SourceConfig
from gateway.config.server import ServerConfig
from gateway.config.sources import Millis, Model
from gateway.core import templates

Seconds = Annotated[int, Field(ge=0, le=30 * 86400)]


class PropagationConfig(Model):
    """The headers that carry the request id and the remaining budget to HTTP upstreams."""

    request_id_header: str = "X-Request-ID"
    """The header that carries the request id to HTTP upstreams."""
    deadline_header: str = "X-Request-Deadline-Ms"
    """The header that carries the milliseconds left before the endpoint's deadline."""

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


class BatchConfig(Model):
    """How one call asks for many items at once, when a listing computes them together.

    `{id*}` (the item endpoint's parameter, starred) is the list of the items' values:
    comma-joined in an http `path` or `query` value, one bound placeholder per value in a sql
    `query` (`IN %(id*)s`). `key` is the field of each returned element (or row) that names its
    item; `max` splits a batch into chunks that run concurrently.
    """

    path: str | None = Field(default=None, examples=["/prices", "/prices/{id*}"])
    """(http) The path of the request for many items."""
    query: str | dict[str, str] | None = Field(
        default=None,
        examples=[{"ids": "{id*}"}, "SELECT id, name FROM products WHERE id IN %(id*)s"],
    )
    """(http) Query values of the request for many items; (sql) the query for many ids."""
    key: Annotated[str, Field(min_length=1, max_length=100)] = Field(examples=["product_id"])
    """The field of each returned element (or row) that names its item."""
    max: Annotated[int, Field(ge=1, le=1000)] = 100
    """Ids per request; more make several requests, sent concurrently."""
    timeout_ms: Millis | None = Field(default=None, examples=[500])
    """One batch request's timeout (a batch may take longer than one item); default: the
    call's own."""


class CallConfig(Model):
    """One call of an endpoint: which source, what to ask, and what to do when it fails."""

    source: str = Field(examples=["catalog"])
    """The name of the source this call asks (a key of `sources`)."""
    path: str | None = Field(default=None, examples=["/prices/{id}"])
    """(http) The URL path template; each value is percent-encoded as one segment part."""
    query: str | dict[str, str] | None = Field(
        default=None,
        examples=[
            {"category": "{product.category}"},
            "SELECT id, name FROM products WHERE id = %(id)s",
        ],
    )
    """(http) Query values, templates allowed; (sql) the SQL text, its `%(name)s`
    placeholders bound by the driver."""
    args: dict[str, str] = Field(
        default_factory=dict, examples=[{"category": "{product.category}"}]
    )
    """(sql) Values for placeholders that are not path parameters, templates allowed."""
    one: bool = False
    """(sql) `true`: the first row as an object (`not_found` when there is none); else the list
    of rows."""
    required: bool = False
    """`true`: no answer without this call (404/502/503/504, or a stale copy)."""
    fallback: Any = Field(default=None, examples=[{"currency": "USD", "amount": None}, "omit"])
    """An optional call's value when it fails: a value, `null` (the default), or `omit` (leave
    the key out)."""
    select: tuple[str, ...] | None = Field(default=None, examples=[["currency", "amount"]])
    """Keep only these fields of the result (of each item, for a list)."""
    timeout_ms: Millis | None = Field(default=None, examples=[150])
    """This call's attempt timeout in ms, instead of its source's."""
    forward_headers: tuple[HeaderName, ...] = Field(default=(), examples=[["Accept-Language"]])
    """(http) Request headers copied to this call; on a cached endpoint each must also be in
    `cache.vary`."""
    batch: BatchConfig | None = Field(
        default=None, examples=[{"path": "/prices", "query": {"ids": "{id*}"}, "key": "product_id"}]
    )
    """How this call asks for many items at once, when a listing computes them."""
    max_rows: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """A sql call's result may hold this many rows; more is that call's `error`."""
    ignore_upstream_cache_control: bool = False
    """Whether this call's upstream `Cache-Control` is ignored for the composite's caching."""
    schema_: dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        examples=[{"type": "array", "items": {"type": "integer"}}],
    )
    """The JSON Schema of this call's result (before `select` narrows it): the OpenAPI
    document's type for it, and what `validate` checks."""
    schema_file: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        default=None, examples=["schemas/price.yaml"]
    )
    """Or: a JSON or YAML file holding that schema, relative to the config file's directory."""
    validate_: bool | None = Field(default=None, alias="validate", examples=[True])
    """`true`: a result that breaks the schema is this call's `error` (reason `schema`);
    default: the endpoint's `validate`."""

    @model_validator(mode="after")
    def _one_schema(self) -> CallConfig:
        if self.schema_ is not None and self.schema_file is not None:
            raise ValueError("give schema (inline) or schema_file, not both")
        return self

    @property
    def has_fallback(self) -> bool:
        return "fallback" in self.model_fields_set

    @property
    def omit(self) -> bool:
        return self.fallback == "omit"


class EndpointCache(Model):
    """How long composite answers of one endpoint are kept."""

    ttl_s: Seconds = 60
    """How long a complete answer is fresh, in seconds."""
    partial_ttl_s: Seconds = 0
    """How long a partial answer (an optional call failed) is kept, in seconds; 0: never."""
    stale_while_revalidate_s: Seconds = 0
    """How long past `ttl_s` an answer is still served while one background refresh runs."""
    stale_if_error_s: Seconds = 0
    """How long past `ttl_s` an answer is served instead of a failed required call's error."""
    not_found_ttl_s: Seconds = 30
    """How long a 404 (a required call found nothing) is kept, in seconds."""
    allow_client_bypass: bool = False
    """Whether a request's `Cache-Control: no-cache` skips the cached answer."""
    tags: tuple[str, ...] = Field(default=(), examples=[["product:{id}"]])
    """Tags to purge answers by (`POST /admin/cache/purge`), templates allowed."""
    vary: tuple[HeaderName, ...] = Field(default=(), examples=[["Accept-Language"]])
    """Request headers that are part of the cache key and of the `Vary` header."""


class ShapeField(Model):
    """One field of a shaped document: the dotted path it reads, and its value when missing."""

    from_: str = Field(
        alias="from",
        min_length=1,
        max_length=500,
        examples=["price.amount", "reviews.items.0.text"],
    )
    """The dotted path it reads: a call's name, then fields; a number is a list index."""
    default: Any = Field(default=None, examples=["USD", 0])
    """Its value when the path leads nowhere; without one, the field is left out."""

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set


class ListIds(Model):
    """Where a listing's ids come from: a query parameter (`?ids=3,1,2`), or a field of each
    element of one of the listing's own calls."""

    query: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", max_length=100)] | None = (
        Field(default=None, examples=["ids"])
    )
    """The query parameter holding the ids, comma-separated or repeated (`?ids=3,1,2`)."""
    call: str | None = Field(default=None, examples=["page"])
    """Or: the listing's own call whose result lists the ids."""
    field: str | None = Field(default=None, examples=["id"])
    """With `call`: the field of each element that is an id."""
    max: Annotated[int, Field(ge=1, le=1000)] = 48
    """The most ids one listing fetches."""

    @model_validator(mode="after")
    def _one_origin(self) -> ListIds:
        if (self.query is None) == (self.call is None):
            raise ValueError("give either query (a query parameter) or call (and field)")
        if self.call is not None and not self.field:
            raise ValueError("ids from a call need field: the field of each element that is an id")
        if self.query is not None and self.field is not None:
            raise ValueError("field goes with call, not with query")
        return self


class ListConfig(Model):
    """A listing: one item document per id, built as the item endpoint builds it."""

    item: str = Field(examples=["/products/{id:int}"])
    """The item endpoint's path, exactly as written there; its one parameter is the id."""
    ids: ListIds = Field(examples=[{"query": "ids", "max": 48}, {"call": "page", "field": "id"}])
    """Where the ids come from: a query parameter, or a call and a field."""


class EndpointConfig(Model):
    """One aggregated endpoint: a path, a deadline, calls, and its cache; or a listing."""

    path: str = Field(examples=["/products/{id:int}"])
    """The route, with typed parameters `{name:int|str|float}`."""
    deadline_ms: Millis = 1000
    """The whole answer's deadline in ms, retries and hedges included."""
    cache: EndpointCache | None = Field(
        default=None, examples=[{"ttl_s": 60, "partial_ttl_s": 5, "stale_while_revalidate_s": 300}]
    )
    """How long answers are cached; without it, they are not."""
    calls: dict[str, CallConfig] = Field(
        default_factory=dict,
        examples=[{"price": {"source": "pricing", "path": "/prices/{id}"}}],
    )
    """The calls, by name, in the order their results appear in the answer."""
    listing: ListConfig | None = Field(
        default=None,
        alias="list",
        examples=[{"item": "/products/{id:int}", "ids": {"query": "ids"}}],
    )
    """Makes this endpoint a listing: one item document per id."""
    shape: dict[str, str | ShapeField] | None = Field(
        default=None,
        examples=[
            {"title": "product.name", "currency": {"from": "price.currency", "default": "USD"}}
        ],
    )
    """The document field by field (`title: product.name`); without it, each call's result
    sits under its call's name."""
    validate_: bool = Field(default=False, alias="validate")
    """`true`: every call that declares a schema checks its results against it (a call's own
    `validate` wins)."""

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


PARAM_TYPES = ("int", "str", "float")


class NearCacheConfig(Model):
    """An in-process tier in front of Redis for the hottest keys, a few seconds at most."""

    max_entries: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Answers the near tier holds at most."""
    ttl_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    """How long an answer is held there at most, in seconds."""


class CacheConfig(Model):
    """Where composite answers are cached: `redis://`, `redis+cluster://` or `memory://`."""

    url: str = Field(
        default="memory://", examples=["memory://", "${REDIS_URL:-redis://127.0.0.1:6379/0}"]
    )
    """`memory://` (in-process), `redis://`, `rediss://` or `redis+cluster://`."""
    key_prefix: str = "gw:"
    """Put before every cache key."""
    op_timeout_ms: Millis = 20
    """One cache operation's timeout in ms: a slow or down cache means uncached answers."""
    memory_max_entries: Annotated[int, Field(ge=1)] = 10_000
    """(memory://) Answers kept at most."""
    memory_max_bytes: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024
    """(memory://) Bytes of answers kept at most."""
    compress_min_bytes: Annotated[int, Field(ge=0)] = 4096
    """Answers of at least this many bytes are stored zlib-compressed."""
    max_entry_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 8 * 1024 * 1024
    """A longer answer is served but not stored, and no longer value is read back."""
    near: NearCacheConfig | None = Field(default=None, examples=[{"max_entries": 1000, "ttl_s": 1}])
    """(Redis only) An in-process tier in front of Redis for the hottest keys."""

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


OTEL_PACKAGES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")
"""What exporting traces imports: the optional `otel` extra."""


class TracingConfig(Model):
    """Export of traces over OTLP/HTTP: a span per request, per call attempt and per cache
    operation. Needs the `otel` extra (`pip install '.[otel]'`)."""

    otlp_endpoint: Annotated[str, Field(max_length=2048, examples=["http://127.0.0.1:4318"])]
    """The OTLP/HTTP collector's base URL (http or https); spans go to its `/v1/traces`."""
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """The share of traces started here that are recorded; a client's sampled flag decides
    for the traces it started."""
    service_name: Annotated[str, Field(min_length=1, max_length=200)] = "gateway"
    """The `service.name` the spans are exported under."""

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("the OTLP endpoint is a plain URL: no query, fragment or user")
        return v

    @model_validator(mode="after")
    def _sdk_installed(self) -> TracingConfig:
        missing = [name for name in OTEL_PACKAGES if not _importable(name)]
        if missing:
            raise ValueError(
                "tracing needs the OpenTelemetry SDK and OTLP exporter, which are not installed "
                f"({missing[0].split('.')[1]} missing): pip install '.[otel]'"
            )
        return self


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


class GatewayConfig(Model):
    """A whole gateway.yaml, parsed and cross-checked."""

    version: Literal[1] = 1
    """The config language's version."""
    cache: CacheConfig = Field(
        default=CacheConfig(), examples=[{"url": "redis://127.0.0.1:6379/0"}]
    )
    """Where composite answers are cached."""
    propagation: PropagationConfig = Field(
        default=PropagationConfig(), examples=[{"request_id_header": "X-Correlation-ID"}]
    )
    """Which headers tell HTTP upstreams the request id and the remaining budget."""
    server: ServerConfig = Field(default=ServerConfig(), examples=[{"max_connections": 1024}])
    """What one client connection may cost `gateway serve`, per process; read when it starts."""
    tracing: TracingConfig | None = Field(
        default=None,
        examples=[{"otlp_endpoint": "http://127.0.0.1:4318", "sample_ratio": 0.1}],
    )
    """Export traces over OTLP/HTTP (the `otel` extra); without it, trace context is still read
    and propagated."""
    sources: dict[str, SourceConfig] = Field(
        examples=[{"pricing": {"kind": "http", "base_url": "http://127.0.0.1:9101"}}]
    )
    """The upstreams, by name."""
    endpoints: list[EndpointConfig] = Field(
        examples=[[{"path": "/prices/{id:int}", "calls": {"price": {"source": "pricing"}}}]]
    )
    """The aggregated endpoints."""
