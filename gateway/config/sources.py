"""What every source has in gateway.yaml, whatever its kind: the base model, its timeout, and the
config of the policies around its calls (retry, breaker, hedge). Each kind's own model extends
`SourceModel` beside its row in `gateway.config.kinds`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
