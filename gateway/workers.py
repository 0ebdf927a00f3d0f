"""The workers of one `gateway serve --workers N`, as one gateway: one config, seen together.

They share a directory (`GATEWAY_WORKERS_DIR`, made by `gateway serve`), no service:
`gen-N.json` holds config generation N (the file's text, validated before it was written),
`ack-N-PID.json` a worker's answer to it, `worker-PID.json` a worker's latest statistics and
process samples, rewritten every second (and its sign of life). A reload validates the file and
swaps in one worker, then publishes the text as the next generation; every other worker loads
that same text (never the file again, which may have changed meanwhile) and answers. Every wait
is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import structlog
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from gateway.config import loader as config_mod
from gateway.config.loader import LoadedConfig
from gateway.config.redact import redact_text
from gateway.core.errors import ConfigError, SourceError
from gateway.ops.metrics import Family, process_families

if TYPE_CHECKING:
    from gateway.runtime import Runtime

_log = structlog.get_logger("gateway.app")


class Swapping(Protocol):
    """The running gateway, as a reload across workers sees it (`gateway.app.Gateway`)."""

    loaded: LoadedConfig

    async def swap(self, loaded: LoadedConfig) -> Runtime: ...


WORKERS_ENV = "GATEWAY_WORKERS_DIR"

ACK_WAIT_S = 10.0
"""How long a reload waits for the other workers' answers before naming them `no answer`."""

FOLLOW_EVERY_S = 0.2
"""How often a worker looks for a new config generation."""

SNAPSHOT_EVERY_S = 1.0
FRESH_S = 5.0
"""A worker whose snapshot is older than this is not counted (hung, or killed without a word)."""

KEEP_GENERATIONS = 8

_GEN = re.compile(r"gen-(\d+)\.json")
_ACK = re.compile(r"ack-(\d+)-(\d+)\.json")
_WORKER = re.compile(r"worker-(\d+)\.json")


@dataclass(frozen=True)
class Ack:
    """One worker's answer to a generation: `reloaded`, `failed` (with why), `superseded` (it
    went on to a later one), `no answer` within the wait, or `gone` (it exited meanwhile)."""

    pid: int
    status: str
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the answer as JSON data."""
        return {"pid": self.pid, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class Everywhere:
    """What a reload did across workers: the generation published and every worker's answer."""

    generation: int | None
    acks: tuple[Ack, ...]

    @property
    def failed(self) -> list[Ack]:
        """Return the answers of workers that run another config now (`gone` ones excluded)."""
        return [a for a in self.acks if a.status not in ("reloaded", "superseded", "gone")]

    def report(self) -> dict[str, Any]:
        """Return how many workers reloaded, which did not, and the generation, as JSON data."""
        counted = [a for a in self.acks if a.status != "gone"]
        return {
            "generation": self.generation,
            "count": len(counted),
            "reloaded": sum(a.status in ("reloaded", "superseded") for a in counted),
            "failed": [a.as_dict() for a in self.failed],
        }


class WorkerDir:
    """This process's view of the directory the workers of one `gateway serve` share."""

    def __init__(self, path: str, pid: int | None = None) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self.applied = 0
        """The generation this worker runs (or refused): it follows only later ones."""
        self.lock = asyncio.Lock()
        self._tmp = itertools.count()

    @classmethod
    def from_env(cls) -> WorkerDir | None:
        """Return the directory `GATEWAY_WORKERS_DIR` names, or None (one process alone)."""
        path = os.environ.get(WORKERS_ENV)
        return cls(path) if path else None

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _temporary(self, data: bytes) -> str:
        """Return the path of a new private file holding `data`, for a rename or a link."""
        tmp = self._file(f".tmp-{self.pid}-{next(self._tmp)}")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        return tmp

    def _write(self, name: str, data: bytes) -> None:
        """Replace `name` with `data` in one rename: a reader sees the old file or the new."""
        os.replace(self._temporary(data), self._file(name))

    def latest(self) -> int:
        """Return the number of the latest generation published (0: none yet)."""
        numbers = (int(m[1]) for n in os.listdir(self.path) if (m := _GEN.fullmatch(n)))
        return max(numbers, default=0)

    def read(self, number: int) -> tuple[str, str]:
        """Return generation `number`'s file name and text (`OSError`: never published, or
        pruned)."""
        data = self._json(f"gen-{number}.json")
        return data["file"], data["text"]

    def publish(self, file: str, text: str) -> int:
        """Publish `text` (read from `file`, already validated) as the next generation; return its
        number."""
        tmp = self._temporary(orjson.dumps({"file": file, "text": text, "by": self.pid}))
        try:
            for _ in range(1000):  # each miss means another process published meanwhile
                number = self.latest() + 1
                try:
                    # A link fails if the name exists: two publishers never share a number.
                    os.link(tmp, self._file(f"gen-{number}.json"))
                except FileExistsError:
                    continue
                self._prune(number)
                return number
            raise RuntimeError(f"could not publish a config generation in {self.path}")
        finally:
            os.unlink(tmp)

    def starting(self) -> LoadedConfig | None:
        """Return the latest generation's config for a worker that starts now (None: none yet,
        or it does not load here), and follow only later ones from now on."""
        number = self.latest()
        self.applied = number
        if number == 0:
            return None
        try:
            file, text = self.read(number)
            return config_mod.loads(text, file)
        except (OSError, ConfigError):
            return None

    def acknowledge(self, number: int, status: str, detail: str | None = None) -> None:
        """Write this worker's answer to generation `number`."""
        body = {"pid": self.pid, "status": status, "detail": detail}
        self._write(f"ack-{number}-{self.pid}.json", orjson.dumps(body))

    def answers(self, number: int, pids: Collection[int]) -> dict[int, Ack]:
        """Return the answers to generation `number` of those of `pids` that have one (a later
        generation's answer counts as `superseded`; an exited worker is `gone`)."""
        later: set[int] = set()
        found: dict[int, Ack] = {}
        for name in os.listdir(self.path):
            if (m := _ACK.fullmatch(name)) is None or int(m[2]) not in pids:
                continue
            pid, gen = int(m[2]), int(m[1])
            if gen > number:
                later.add(pid)
            elif gen == number:
                try:
                    data = self._json(name)
                except OSError:
                    continue  # pruned meanwhile: a later generation was published
                found[pid] = Ack(pid, data["status"], data.get("detail"))
        for pid in pids:
            if pid not in found:
                if pid in later:
                    found[pid] = Ack(pid, "superseded")
                elif not _alive(pid):
                    found[pid] = Ack(pid, "gone")
        return found

    def wait(self, number: int, pids: Collection[int], within_s: float = ACK_WAIT_S) -> list[Ack]:
        """Return every one of `pids`' answers to generation `number`, waiting at most
        `within_s` (in this thread); those still silent then are `no answer`."""
        ends = time.monotonic() + within_s
        found = self.answers(number, pids)
        while len(found) < len(pids) and time.monotonic() < ends:
            time.sleep(0.05)
            found = self.answers(number, pids)
        silent = f"no answer within {within_s:g} s"
        return [found.get(pid, Ack(pid, "no answer", silent)) for pid in sorted(pids)]

    def write_snapshot(self, data: bytes) -> None:
        """Replace this worker's snapshot (its statistics, and its sign of life)."""
        self._write(f"worker-{self.pid}.json", data)

    def leave(self) -> None:
        """Remove this worker's snapshot: it no longer counts among the workers."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(f"worker-{self.pid}.json"))

    def workers(self, fresh_s: float = FRESH_S) -> set[int]:
        """Return the pids of the live workers, this one included once it wrote a snapshot."""
        now = time.time()
        pids = set()
        for name in os.listdir(self.path):
            if (m := _WORKER.fullmatch(name)) is None:
                continue
            with contextlib.suppress(FileNotFoundError):  # it left meanwhile
                if now - os.stat(self._file(name)).st_mtime <= fresh_s and _alive(int(m[1])):
                    pids.add(int(m[1]))
        return pids

    def snapshots(self, fresh_s: float = FRESH_S) -> dict[int, dict[str, Any]]:
        """Return the other live workers' latest snapshots by pid."""
        found = {}
        for pid in self.workers(fresh_s) - {self.pid}:
            with contextlib.suppress(OSError):  # it left meanwhile
                found[pid] = self._json(f"worker-{pid}.json")
        return found

    def _json(self, name: str) -> Any:
        with open(self._file(name), "rb") as f:
            return orjson.loads(f.read())

    def _prune(self, latest: int) -> None:
        oldest = latest - KEEP_GENERATIONS
        for name in os.listdir(self.path):
            m = _GEN.fullmatch(name) or _ACK.fullmatch(name)
            if m is not None and int(m[1]) <= oldest:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._file(name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def reload_everywhere(
    gw: Swapping, wd: WorkerDir, *, only_if_changed: bool = False, within_s: float = ACK_WAIT_S
) -> tuple[Runtime, Everywhere] | None:
    """Validate the config file and swap to it in this worker, then publish its text for every
    other worker and wait (at most `within_s`) for their answers.

    Raises `ConfigError` or `SourceError`, having published nothing, when this worker cannot
    swap; returns None when `only_if_changed` and the file holds what runs (or is about to).
    """
    async with wd.lock:
        loaded = config_mod.load(gw.loaded.file)
        if only_if_changed and (loaded.text == gw.loaded.text or _latest_text(wd) == loaded.text):
            return None
        others = wd.workers() - {wd.pid}
        new = await gw.swap(loaded)
        number = wd.publish(loaded.file, loaded.text)
        wd.applied = number
        wd.acknowledge(number, "reloaded")
    acks = await asyncio.to_thread(wd.wait, number, others, within_s)
    return new, Everywhere(number, (Ack(wd.pid, "reloaded"), *acks))


def _latest_text(wd: WorkerDir) -> str | None:
    with contextlib.suppress(OSError):  # none yet (gen-0 is never written), or pruned
        return wd.read(wd.latest())[1]
    return None


async def follow(gw: Swapping, wd: WorkerDir, every_s: float = FOLLOW_EVERY_S) -> None:
    """Swap to every generation another process publishes and answer it, until cancelled."""
    failing = _Failing("workers_dir_unreadable")
    while True:
        await asyncio.sleep(every_s)
        try:
            if wd.latest() > wd.applied:
                await apply_latest(gw, wd)
        except OSError as exc:  # the directory itself: said once, tried again next tick
            failing(exc)
        else:
            failing.ok()


async def apply_latest(gw: Swapping, wd: WorkerDir) -> None:
    """Swap to the latest generation (unless this worker runs it already) and answer it."""
    async with wd.lock:
        number = wd.latest()
        if number <= wd.applied:
            return
        wd.applied = number  # refused or not, never tried twice
        try:
            file, text = wd.read(number)
            loaded = config_mod.loads(text, file)
        except OSError as exc:
            wd.acknowledge(number, "failed", f"cannot read generation {number}: {exc.strerror}")
            return
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            _log.warning("config_reload_refused", generation=number, problems=problems)
            wd.acknowledge(number, "failed", "; ".join(problems))
            return
        try:
            await gw.swap(loaded)
        except SourceError as exc:
            detail = redact_text(str(exc), loaded.secrets)
            _log.warning("config_reload_failed", generation=number, error=detail)
            wd.acknowledge(number, "failed", detail)
            return
        wd.acknowledge(number, "reloaded")


async def share_snapshots(
    wd: WorkerDir,
    snapshot: Callable[[], Mapping[str, Any]],
    in_thread: Callable[[], Mapping[str, Any]],
    every_s: float = SNAPSHOT_EVERY_S,
) -> None:
    """Write this worker's snapshot now and every `every_s` until cancelled: `snapshot()`'s
    data (read on the event loop, which owns it) with `in_thread()`'s (read in a thread, with
    the writing: /proc reads and the like stay off the loop)."""

    def write(data: Mapping[str, Any]) -> None:
        wd.write_snapshot(orjson.dumps({**data, **in_thread()}))

    failing = _Failing("worker_snapshot_failed")
    while True:
        try:
            await asyncio.to_thread(write, snapshot())
        except OSError as exc:  # a full disk: the siblings leave this worker out meanwhile
            failing(exc)
        else:
            failing.ok()
        await asyncio.sleep(every_s)


class _Failing:
    """Logs an error of the shared directory when it starts or changes, not on every retry."""

    def __init__(self, event: str) -> None:
        self.event, self.last = event, ""

    def __call__(self, exc: OSError) -> None:
        if (said := f"{type(exc).__name__}: {exc.strerror}") != self.last:
            self.last = said
            _log.warning(self.event, error=said)

    def ok(self) -> None:
        self.last = ""


class WorkersCollector(Collector):
    """Reports this worker's process samples and every other live worker's (as each last shared
    them), each sample labelled with its worker's `pid`: prometheus_client's process and garbage
    collector figures are per process, and multiprocess mode keeps no files for them."""

    def __init__(self, wd: WorkerDir) -> None:
        self.wd = wd

    def collect(self) -> Iterator[Metric]:
        by_pid: dict[int, list[Family]] = {os.getpid(): process_families()}
        for pid, snapshot in self.wd.snapshots().items():
            by_pid[pid] = snapshot.get("metrics", [])
        found: dict[str, Metric] = {}
        for pid in sorted(by_pid):
            for name, typ, text, samples in by_pid[pid]:
                family = found.get(name)
                if family is None:
                    family = found[name] = Metric(name, text, typ)
                for sample, labels, value in samples:
                    family.add_sample(sample, {**labels, "pid": str(pid)}, value)
        return iter(found.values())
