"""The answers of the admin API, as the OpenAPI document describes them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class Unauthorized(BaseModel):
    """The answer to an admin request without the token, or with a wrong one (401)."""

    detail: str


class EffectiveConfig(BaseModel):
    """`/admin/config`: the file read and its config, every secret replaced by ***."""

    file: str
    config: dict[str, Any]


class WorkerAck(BaseModel):
    """One worker's answer to a reload."""

    pid: int
    status: str
    detail: str | None


class WorkersReport(BaseModel):
    """How many workers a reload reached, how many reloaded, and which did not."""

    generation: int | None
    count: int
    reloaded: int
    failed: list[WorkerAck]


class Reloaded(BaseModel):
    """`/admin/reload` done: which sources were kept, opened and are closing, and the workers'."""

    status: Literal["reloaded", "partly reloaded"]
    file: str
    kept: list[str]
    opened: list[str]
    closing: list[str]
    workers: WorkersReport


class Refused(BaseModel):
    """`/admin/reload` of an invalid file: its `file:line` problems; nothing changed."""

    error: Literal["invalid config"]
    problems: list[str]


class Failure(BaseModel):
    """What could not be done, and why."""

    error: str
    detail: str


class Message(BaseModel):
    """Why a request could not be answered."""

    error: str


class SourcesReport(BaseModel):
    """`/admin/sources`: each source's window statistics, the cache's and the process's."""

    window_s: float
    time: float
    sources: dict[str, dict[str, Any]]
    cache: dict[str, Any]
    process: dict[str, Any]
    workers: dict[str, Any] | None = None
    """Set under `--workers N`: how the figures were merged, and each worker's."""


class Purged(BaseModel):
    """`/admin/cache/purge`: how many keys were removed."""

    removed: int
