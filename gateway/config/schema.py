"""gateway.yaml's schema: typed, frozen pydantic models of the whole file but its sources, whose
models are the kinds' (`gateway.config.kinds`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config.kinds import SourceConfig
from gateway.config.sources import Millis, Model
from gateway.core import templates
from gateway.edge.limits import DEFAULT_LIMITS as _LIMITS
from gateway.edge.limits import ConnectionLimits

Seconds = Annotated[int, Field(ge=0, le=30 * 86400)]


class PropagationConfig(Model):
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


class BatchConfig(Model):
    """How one call asks for many items at once, when a listing computes them together.

    `{id*}` (the item endpoint's parameter, starred) is the list of the items' values:
    comma-joined in an http `path` or `query` value, one bound placeholder per value in a sql
    `query` (`IN %(id*)s`). `key` is the field of each returned element (or row) that names its
    item; `max` splits a batch into chunks that run concurrently.
    """

    path: str | None = None
    query: str | dict[str, str] | None = None
    key: Annotated[str, Field(min_length=1, max_length=100)]
    max: Annotated[int, Field(ge=1, le=1000)] = 100
    timeout_ms: Millis | None = None
    """One batch request's timeout (a batch may take longer than one item); default: the
    call's own."""


class CallConfig(Model):
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
    batch: BatchConfig | None = None
    max_rows: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """A sql call's result may hold this many rows; more is that call's `error`."""
    ignore_upstream_cache_control: bool = False
    """Whether this call's upstream `Cache-Control` is ignored for the composite's caching."""

    @property
    def has_fallback(self) -> bool:
        return "fallback" in self.model_fields_set

    @property
    def omit(self) -> bool:
        return self.fallback == "omit"


class EndpointCache(Model):
    """How long composite answers of one endpoint are kept."""

    ttl_s: Seconds = 60
    partial_ttl_s: Seconds = 0
    stale_while_revalidate_s: Seconds = 0
    stale_if_error_s: Seconds = 0
    not_found_ttl_s: Seconds = 30
    allow_client_bypass: bool = False
    tags: tuple[str, ...] = ()
    vary: tuple[HeaderName, ...] = ()


class ShapeField(Model):
    """One field of a shaped document: the dotted path it reads, and its value when missing."""

    from_: str = Field(alias="from", min_length=1, max_length=500)
    default: Any = None

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set


class ListIds(Model):
    """Where a listing's ids come from: a query parameter (`?ids=3,1,2`), or a field of each
    element of one of the listing's own calls."""

    query: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", max_length=100)] | None = (
        None
    )
    call: str | None = None
    field: str | None = None
    max: Annotated[int, Field(ge=1, le=1000)] = 48

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

    item: str
    ids: ListIds


class EndpointConfig(Model):
    """One aggregated endpoint: a path, a deadline, calls, and its cache; or a listing."""

    path: str
    deadline_ms: Millis = 1000
    cache: EndpointCache | None = None
    calls: dict[str, CallConfig] = Field(default_factory=dict)
    listing: ListConfig | None = Field(default=None, alias="list")
    shape: dict[str, str | ShapeField] | None = None
    """The document field by field (`title: product.name`); without it, each call's result
    sits under its call's name."""

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
    ttl_s: Annotated[float, Field(gt=0, le=10)] = 1.0


class CacheConfig(Model):
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


class ServerConfig(Model):
    """How `gateway serve` treats client connections, per process: read when it starts."""

    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = _LIMITS.max_connections
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = _LIMITS.max_header_bytes
    header_timeout_s: Annotated[float, Field(gt=0, le=300)] = _LIMITS.header_timeout_s
    body_timeout_s: Annotated[float, Field(gt=0, le=300)] = _LIMITS.body_timeout_s
    keepalive_s: Annotated[float, Field(gt=0, le=300)] = _LIMITS.keepalive_s
    drain_s: Annotated[float, Field(ge=0, le=600)] = _LIMITS.drain_s

    def limits(self) -> ConnectionLimits:
        """Return these settings as the edge server takes them."""
        return ConnectionLimits(**self.model_dump())


class GatewayConfig(Model):
    """A whole gateway.yaml, parsed and cross-checked."""

    version: Literal[1] = 1
    cache: CacheConfig = CacheConfig()
    propagation: PropagationConfig = PropagationConfig()
    server: ServerConfig = ServerConfig()
    sources: dict[str, SourceConfig]
    endpoints: list[EndpointConfig]
