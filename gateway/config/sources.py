"""What every source has in gateway.yaml, whatever its kind: the base model, its timeout, and the
config of the policies around its calls (retry, breaker, hedge). Each kind's own model extends
`SourceModel` beside its row in `gateway.config.kinds`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Model(BaseModel):
    """A config model: unknown keys are errors, and a parsed value never changes."""

    # Field docstrings are the fields' descriptions in `gateway schema`'s JSON Schema.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


Millis = Annotated[int, Field(gt=0, le=3_600_000)]

RetryOn = Literal["timeout", "connect", "error", 500, 502, 503, 504, 429]


class RetryConfig(Model):
    """Retries of one source's idempotent calls, bounded by the deadline and a budget."""

    attempts: Annotated[int, Field(ge=1, le=10)] = 2
    """Attempts in all, the first included."""
    backoff_ms: Annotated[int, Field(ge=0, le=60_000)] = 10
    """The wait before the first retry, in ms; it doubles with each retry."""
    max_backoff_ms: Annotated[int, Field(ge=0, le=60_000)] = 200
    """The longest wait before one retry, in ms."""
    jitter: bool = True
    """Whether each wait is random, between 0 and the backoff (full jitter)."""
    on: tuple[RetryOn, ...] = ("timeout", "connect", 502, 503, 504)
    """What is retried: `timeout`, `connect` (a refused connection), `error` (any other
    failure), or an upstream status (500, 502, 503, 504, 429)."""
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    """Retries and hedges are at most this share of the source's calls over a 10 s window
    (3 per window are always allowed)."""


class BreakerConfig(Model):
    """A circuit breaker on one source's failure ratio over a sliding window."""

    failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    """The breaker opens when failures reach this share of the calls in the window..."""
    min_calls: Annotated[int, Field(ge=1)] = 20
    """...and the window holds at least this many calls."""
    window_s: Annotated[int, Field(ge=1, le=3600)] = 10
    """The sliding window's length, in seconds."""
    open_ms: Millis = 5000
    """How long it stays open (calls fail at once) before letting probes through, in ms."""
    half_open_calls: Annotated[int, Field(ge=1, le=100)] = 1
    """Probes let through at once when half open; all must succeed to close it."""


HedgePercentile = Literal["p50", "p75", "p90", "p95", "p99"]


class HedgeConfig(Model):
    """Hedged requests of an HTTP source: a second request once the first is late.

    Late means after a fixed `after_ms`, or after the source's live latency percentile `after`.
    """

    after_ms: Millis | None = Field(default=None, examples=[50])
    """Send a second request when the first has not answered after this many ms (less than
    the source's `timeout_ms`)."""
    after: HedgePercentile | None = Field(default=None, examples=["p95"])
    """Or send it after the source's live latency percentile."""

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


class SourceModel(Model):
    """What every source kind has: a timeout and the optional policies around its calls."""

    kind: str
    """`http` or `sql`: what kind of source this is."""
    timeout_ms: Millis = 1000
    """One attempt's timeout in ms (pool wait, connect, send, read and decode); a call's own
    `timeout_ms` overrides it."""
    retry: RetryConfig | None = Field(
        default=None, examples=[{}, {"attempts": 3, "on": ["timeout", 503]}]
    )
    """Retries of failed calls, within the deadline; `{}` turns them on with every default."""
    breaker: BreakerConfig | None = Field(default=None, examples=[{}, {"failure_ratio": 0.5}])
    """A circuit breaker: while it is open, calls fail at once; `{}` turns it on with every
    default."""
    max_in_flight: Annotated[int, Field(ge=1)] | None = Field(default=None, examples=[64])
    """A bulkhead: past this many calls running at once, a call fails at once; default: no
    limit."""
    hedge: HedgeConfig | None = Field(default=None, examples=[{"after": "p95"}, {"after_ms": 50}])
    """(http) A second request when the first is late; the first answer wins."""

    @property
    def scheme(self) -> str:
        """The second half of this source's key in `KINDS` (a DSN's scheme; empty for http)."""
        return ""
