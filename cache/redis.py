"""The Redis store, standalone or Cluster: every operation under its own timeout, every driver
error translated into `CacheUnavailable`.

Its scripts are in `cache.redis_scripts` and its clients are made in `cache.redis_clients`. What
remains is one class, `RedisStore`, longer than this project's usual module: each operation is a
few lines, and all of them share the one `_run` boundary (timeout, admission on a Cluster, error
translation), which is what a reader must see beside them.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from hashlib import blake2b
from typing import Any, TypeVar

import orjson
import structlog
from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from cache import redis_clients as clients
from cache import redis_scripts as scripts
from cache.entry import Windows, stored_limit
from cache.near import OnPurge
from cache.store import CacheUnavailable

log = structlog.get_logger("cache.redis")

DISCOVERY_TIMEOUT_S = 5.0
"""Finding a cluster's nodes (CLUSTER SLOTS, COMMAND) may take this long, in the background."""

ADMIN_TIMEOUT_S = 2.0
"""Purges (rare, and may touch many keys) and pings (probes, not requests) get this much time
instead of the op timeout."""

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

LEAK_LOG_EVERY_S = 10.0
"""At most one traceback per this many seconds for failures the client leaks (see `_run`)."""

T = TypeVar("T")


class RedisStore:
    """A `Store` on one Redis client (standalone or Cluster), keys under one prefix."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        prefix: str,
        op_timeout_s: float,
        subscriber: Callable[[], Redis] | None = None,
        max_value_bytes: int = stored_limit(),
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a Redis key prefix must not contain braces (Cluster hash tags)")
        self._client = client
        self._prefix = prefix
        # Classic pub/sub reaches every node of a Cluster, so one plain connection hears it all.
        self._subscriber = subscriber
        self._channel = f"{prefix}purged"
        self._timeout = op_timeout_s
        # Values are read with GETRANGE up to one byte past this: a longer one (which this
        # gateway never writes) costs that much and no more, and reads as corrupt.
        self._last_byte = max_value_bytes
        # redis-py's async Cluster client has no blocking pool (redis/redis-py#2522): past
        # max_connections on a node it raises. Capping operations in flight makes callers queue
        # instead, within their op timeout, as BlockingConnectionPool does for one server.
        self._in_flight = (
            asyncio.Semaphore(clients.MAX_CONNECTIONS) if isinstance(client, RedisCluster) else None
        )
        # Called by SHA (EVALSHA); redis-py loads a script again when a server answers NOSCRIPT
        # (a restart, a SCRIPT FLUSH, a new cluster node), to all primaries of a cluster.
        self._lookup_script = client.register_script(
            scripts.LOOKUP.replace("LAST_BYTE", str(max_value_bytes))
        )
        self._acquire_script = client.register_script(scripts.ACQUIRE)
        self._release_script = client.register_script(scripts.RELEASE)
        self._put_script = client.register_script(scripts.PUT_AND_UNLOCK)
        self._tag_script = client.register_script(scripts.TAG)
        self._discovery: asyncio.Task[None] | None = None
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._admitted_now = 0  # operations holding one of a cluster's `_in_flight` slots
        self._leak_logged_at = float("-inf")

    async def get(self, key: str) -> bytes | None:
        """Return the bytes stored under `key` (at most `max_value_bytes` + 1 of them: more says
        the value is longer), or None when there are none."""
        data = await self._run(
            "get", lambda: self._client.getrange(self._entry(key), 0, self._last_byte)
        )
        # The clients are made without decode_responses, so values come back as bytes; a missing
        # key reads as an empty range, and no entry is empty.
        if not data:
            return None
        return data if isinstance(data, bytes) else data.encode()

    async def put(
        self, key: str, data: bytes, keep_s: float, tags: Sequence[str], unlock: str = ""
    ) -> None:
        """Store `data` for `keep_s` seconds, add `key` to its tags' sets, release `unlock`."""
        keep_ms = max(1, int(keep_s * 1000))
        entry, lock = self._entry(key), self._lock(key)
        if not tags:
            await self._run(
                "put", lambda: self._put_script(keys=(entry, lock), args=(data, keep_ms, unlock))
            )
            return

        async def spread() -> None:
            # A Cluster pipeline refuses EVALSHA, and would split by node anyway: each script
            # goes to its slot's node at the same time.
            await asyncio.gather(
                self._put_script(keys=(entry, lock), args=(data, keep_ms, unlock)),
                *(self._tag_script(keys=(self._tag(t),), args=(key, keep_ms)) for t in tags),
            )

        async def work() -> None:
            # One round trip: the scripts by SHA in one pipeline. redis-py
            # would check that a pipeline's scripts exist first (SCRIPT EXISTS, a round trip of
            # its own) on every execute: a NOSCRIPT is rare enough to load them after it instead.
            for attempt in (1, 2):
                pipe = self._client.pipeline(transaction=False)
                pipe.evalsha(self._put_script.sha, 2, entry, lock, data, keep_ms, unlock)
                for tag in tags:
                    pipe.evalsha(self._tag_script.sha, 1, self._tag(tag), key, keep_ms)
                results = await pipe.execute(raise_on_error=False)
                failed = [r for r in results if isinstance(r, Exception)]
                if not failed:
                    return
                if attempt == 1 and all(isinstance(r, NoScriptError) for r in failed):
                    # Every script is idempotent: the whole pipeline runs again once loaded.
                    for script in (self._put_script, self._tag_script):
                        await self._client.script_load(script.script)
                    continue
                raise failed[0]

        await self._run("put", spread if self._in_flight is not None else work)

    async def lookup(
        self, key: str, token: str, hold_s: float, windows: Windows, now: float
    ) -> tuple[bool, bytes | None]:
        """Return the entry's bytes (read as `get` reads them) and, only when `windows` say it
        may not be served at `now` (`cache.entry.servable`), whether the lock on `key` was taken
        for `hold_s` seconds, as `acquire` takes it: one script, one round trip."""
        hold_ms = max(1, int(hold_s * 1000))
        keys = (self._entry(key), self._lock(key))
        args = (token, hold_ms, f"{now!r},{_window_args(windows)}")
        got, data = await self._run(
            "lookup", lambda: self._evalsha(self._lookup_script, keys, args)
        )
        return bool(got), data or None

    async def acquire(self, key: str, token: str, hold_s: float) -> tuple[bool, bytes | None]:
        """Take the lock on `key` (SET NX PX) unless another token holds it; return whether it was
        taken and the entry's bytes (read as `get` reads them) in the same script (entry and lock
        share a slot)."""
        hold_ms = max(1, int(hold_s * 1000))
        got, data = await self._run(
            "acquire",
            lambda: self._acquire_script(
                keys=(self._entry(key), self._lock(key)), args=(token, hold_ms, self._last_byte)
            ),
        )
        return bool(got), data

    async def _evalsha(
        self, script: AsyncScript, keys: tuple[str, ...], args: tuple[str | int, ...]
    ) -> Any:
        """Return what `script` returns, called by its SHA, loaded first if the server (or the
        cluster node) answers NOSCRIPT: redis-py's `AsyncScript` call, without its per-call
        overhead (about a tenth of a hit's Redis round trip here)."""
        try:
            return await self._client.execute_command(
                "EVALSHA", script.sha, len(keys), *keys, *args
            )
        except NoScriptError:
            await self._client.script_load(script.script)
            return await self._client.execute_command(
                "EVALSHA", script.sha, len(keys), *keys, *args
            )

    async def release(self, key: str, token: str) -> bool:
        """Release the lock on `key` if `token` holds it (compare-and-delete); return whether."""
        done = await self._run(
            "release", lambda: self._release_script(keys=(self._lock(key),), args=(token,))
        )
        return bool(done)

    async def purge(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete the given keys and every key in the tags' sets, whoever wrote them; count them."""

        async def work() -> int:
            doomed = set(keys)
            for tag in tags:
                members = await self._client.smembers(self._tag(tag))
                doomed |= {m.decode() if isinstance(m, bytes) else m for m in members}
            pipe = self._client.pipeline(transaction=False)
            # One DEL per key: a Cluster pipeline routes each to its slot; a multi-key DEL can't.
            for key in sorted(doomed):
                pipe.delete(self._entry(key))
            for tag in tags:
                pipe.delete(self._tag(tag))
            deleted = await pipe.execute()
            # Every instance's near tier may hold what was just deleted. It evicts by tag itself
            # (each entry it holds keeps its tags), so the message names what was asked, not
            # every member of the tags' sets: its size is the request's, whatever a tag holds.
            await self._client.publish(
                self._channel, orjson.dumps({"keys": list(keys), "tags": list(tags)})
            )
            return sum(deleted[: len(doomed)])

        return await self._run("purge", work, ADMIN_TIMEOUT_S)

    async def listen(self, on_purge: OnPurge, on_ready: Callable[[], None]) -> None:
        """Subscribe to the purges every instance announces: call `on_ready` once subscribed,
        then `on_purge` with each purge's keys and tags; raise `CacheUnavailable` once the
        subscription is lost (or a message cannot be read)."""
        if self._subscriber is None:
            raise CacheUnavailable("redis listen: this store has no subscriber connection")
        client = self._subscriber()
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(ADMIN_TIMEOUT_S):
                await pubsub.subscribe(self._channel)
                # Only the server's confirmation proves that later purges will reach us.
                while await pubsub.get_message(timeout=ADMIN_TIMEOUT_S) is None:
                    pass
            on_ready()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    on_purge(*_purge_of(message.get("data")))
        except (*_FAILURES, ValueError) as exc:
            raise CacheUnavailable(f"redis listen: {exc!r}") from exc
        finally:
            try:
                await pubsub.aclose()
                await client.aclose()
            except _FAILURES:
                pass  # A dead server's sockets are gone already.

    async def ping(self) -> None:
        """Return when Redis answers PING within `ADMIN_TIMEOUT_S`, once a cluster's nodes are
        known (within `DISCOVERY_TIMEOUT_S`); raise `CacheUnavailable` if not.

        A probe is not on the request path: right after start it pays for discovery and first
        connections, which a busy host may not fit in one op timeout, and it must not fail for it.
        """
        if self._in_flight is not None:
            await self._run("discovery", self._discover, DISCOVERY_TIMEOUT_S)
        await self._run("ping", self._client.ping, ADMIN_TIMEOUT_S)

    def pool_stats(self) -> dict[str, int]:
        """Return connections lent out and idle (standalone; a Cluster reports operations in
        flight), and operations given up on that are still finishing."""
        abandoned = len(self._abandoned)
        if isinstance(self._client, RedisCluster) or self._in_flight is not None:
            return {"in_use": self._admitted_now, "abandoned": abandoned}
        # Public since redis-py 8.1: [(n, {..., state: "idle"}), (n, {..., state: "used"})].
        counts = {
            attributes.get("db.client.connection.state"): n
            for n, attributes in self._client.connection_pool.get_connection_count()
        }
        return {"in_use": counts["used"], "idle": counts["idle"], "abandoned": abandoned}

    async def close(self) -> None:
        """Finish abandoned operations, then close the client and its connection pool."""
        if self._discovery is not None:
            self._discovery.cancel()
        pending = [*self._abandoned, *([self._discovery] if self._discovery else [])]
        if pending:
            await asyncio.wait(pending, timeout=ADMIN_TIMEOUT_S)
        try:
            await self._client.aclose()
        except Exception:
            # A dead server's sockets are gone already (and a cluster client closing on a dead
            # node may leak anything, see `_run`): there is nothing left to close.
            pass

    async def _run(
        self, name: str, work: Callable[[], Awaitable[T]], timeout_s: float | None = None
    ) -> T:
        """Return what `work` returns if Redis answers within the op timeout, or raise
        `CacheUnavailable` at that timeout at the latest."""
        task = asyncio.ensure_future(self._admitted(work))
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s or self._timeout)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            # Cancelled but not awaited: redis-py's clean-up of a cancelled read was seen to wait
            # for the server's reply (a stalled server: the whole stall), and the caller must not.
            self._abandon(task)
            raise CacheUnavailable(f"redis {name}: timed out")
        if task.cancelled():  # Not by us: by the client's own clean-up, inside the operation.
            raise CacheUnavailable(f"redis {name}: cancelled inside the client")
        try:
            return task.result()
        except _FAILURES as exc:
            raise CacheUnavailable(f"redis {name}: {exc!r}") from exc
        except Exception as exc:
            # Elsewhere an unexpected exception is a bug that must fail loudly; here it is the
            # client's. redis-py's cluster client leaks the races of its re-discovery after a
            # node's failure (a connection closed under a command being sent: AttributeError on
            # its None writer, RuntimeError on a closed transport), and a cache failure must
            # only ever cost a miss. Logged with its traceback, so a real bug is still seen.
            self._leaked(name, exc)
            raise CacheUnavailable(f"redis {name}: {exc!r}") from exc

    async def _admitted(self, work: Callable[[], Awaitable[T]]) -> T:
        if self._in_flight is None:
            return await work()
        await self._discover()
        async with self._in_flight:
            self._admitted_now += 1
            try:
                return await work()
            finally:
                self._admitted_now -= 1

    def _leaked(self, name: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._leak_logged_at >= LEAK_LOG_EVERY_S:
            self._leak_logged_at = now
            log.warning("redis_client_raised", op=name, exc_info=exc)

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)
        task.add_done_callback(_retrieve)

    async def _discover(self) -> None:
        """Wait (within the caller's op timeout) for the cluster's nodes to be known.

        Discovery runs as one background task that outlives the op timeouts of the callers who
        wait for it: on a busy host it can take longer than 20 ms, and if every caller's timeout
        cancelled it, the cache would never come back. Commands are only let through once it is
        done: commands that race the client's own discovery were seen (redis-py 8.1) to be sent
        on connections it closes meanwhile (AttributeError on a None writer).
        """
        client = self._client
        if not isinstance(client, RedisCluster) or not getattr(client, "_initialize", False):
            return
        if self._discovery is None or self._discovery.done():
            self._discovery = asyncio.create_task(_initialize(client))
            self._discovery.add_done_callback(_retrieve)
        await asyncio.shield(self._discovery)

    def _entry(self, key: str) -> str:
        return f"{self._prefix}{{{_slot_tag(key)}}}:e"

    def _lock(self, key: str) -> str:
        return f"{self._prefix}{{{_slot_tag(key)}}}:l"

    def _tag(self, tag: str) -> str:
        return f"{self._prefix}{{t:{_slot_tag(tag)}}}:t"


async def _initialize(client: RedisCluster) -> None:
    async with asyncio.timeout(DISCOVERY_TIMEOUT_S):
        await client.initialize()


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Its failure reached its callers, or nobody waits any more: either way it must not be
    # logged as "never retrieved".
    if not task.cancelled():
        task.exception()


def _purge_of(data: object) -> tuple[list[str], list[str]]:
    """Return the keys and tags of a purge message; raise `ValueError` if it is not one."""
    doc = orjson.loads(data) if isinstance(data, bytes | str) else None
    if not isinstance(doc, dict):
        raise ValueError(f"not a purge message: {data!r:.80}")
    keys, tags = doc.get("keys"), doc.get("tags")
    if not isinstance(keys, list) or not isinstance(tags, list):
        raise ValueError(f"not a purge message: {data!r:.80}")
    return [str(k) for k in keys], [str(t) for t in tags]


@functools.lru_cache(maxsize=256)
def _window_args(windows: Windows) -> str:
    # The same few policies every request: their part of the script's argument is written once.
    return ",".join(map(repr, windows))


@functools.lru_cache(maxsize=4096)
def _slot_tag(name: str) -> str:
    # A digest, not the name itself: names may hold braces, which would move the hash tag.
    return blake2b(name.encode(), digest_size=10).hexdigest()


def redis_store(
    url: str, prefix: str, op_timeout_s: float, max_value_bytes: int = stored_limit()
) -> RedisStore:
    """Return a store for `redis://`, `rediss://` or `redis+cluster://host:port` (no I/O yet)
    that reads at most `max_value_bytes` + 1 bytes of a value."""
    client = clients.client_of(url, op_timeout_s)
    return RedisStore(client, prefix, op_timeout_s, clients.subscriber_of(url), max_value_bytes)
