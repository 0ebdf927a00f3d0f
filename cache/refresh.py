"""Stale-while-revalidate: one background refresh per stale key in this process, and one across
processes through the store's lock; a refresh that fails leaves the stale copy in place."""

from __future__ import annotations

import asyncio

import structlog

from cache.backend import Backend
from cache.entry import Entry
from cache.lookup import Ask, landed
from cache.store import CacheUnavailable

log = structlog.get_logger("cache")

REFRESH_LOCK_S = 10.0
"""How long a background refresh holds the cross-process lock, at most, if it never releases."""


class Refresher:
    """Background refreshes of stale entries, each owned here until done or cancelled."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def revalidate(self, ask: Ask, stale: Entry) -> None:
        """Start one background refresh of `ask.key` unless this process already runs one."""
        if ask.key in self._refreshing:
            return
        self._refreshing.add(ask.key)
        task = asyncio.create_task(self._refresh(ask, stale))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the refreshes still running and return when they have stopped."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _refresh(self, ask: Ask, stale: Entry) -> None:
        backend = self._backend
        token = backend.token()
        try:
            try:
                got, data = await backend.store.acquire(ask.key, token, REFRESH_LOCK_S)
            except CacheUnavailable as exc:
                backend.failed(exc)
                return  # The copy we serve came from the backend; without it, don't stampede.
            if not got:
                return  # Another process is refreshing (or computing) this key.
            if landed(backend.decode(data), ask.policy, stale, backend.clock()) is not None:
                await backend.release(ask.key, token)
                return  # Another process refreshed it between our read and our lock.
            backend.event("refresh")
            generation = backend.generation()
            try:
                entry = await ask.compute()
            except TimeoutError:
                entry = None
            if entry is None or entry.status >= 500:
                backend.event("refresh_failed")
                await backend.release(ask.key, token)
                return
            if await backend.put(ask, entry, token):
                backend.hold(ask, entry, generation)
        except Exception:
            # A background task has no caller to fail: a bug here is logged loudly, not lost.
            log.exception("cache_refresh_crashed", key=ask.key)
            backend.event("refresh_failed")
            await backend.release(ask.key, token)
        finally:
            self._refreshing.discard(ask.key)
