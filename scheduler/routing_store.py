"""The routing table a scheduler places by: `--routing-file` overlaid with what operators set
through the admin API (`ROUTING_BUCKET`, watched, so every scheduler applies a change to its
next placement without a restart)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from nats.js.kv import KeyValue

from scheduler.routing import RoutingTable
from schemas.jetstream import follow
from schemas.routing import Policy, parse_entry

log = structlog.get_logger(__name__)

SYNC_TIMEOUT = 10.0


class RoutingStore:
    def __init__(self, base: RoutingTable) -> None:
        self._base = base
        self._entries: dict[tuple[str, str], Policy] = {}
        self.table = base
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    async def start(self, kv: KeyValue) -> None:
        """Follow the bucket; waits (at most SYNC_TIMEOUT) until its current entries are in."""
        self._task = asyncio.create_task(follow(lambda: _entries(kv), self._on_entry, name="routing"))
        try:  # place by the operator's policies from the first job on, if the bucket answers in time
            await asyncio.wait_for(self._synced.wait(), SYNC_TIMEOUT)
        except TimeoutError:
            log.warning("routing.sync_slow")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def apply(self, entry: str, value: bytes | None) -> None:
        """One KV update: a policy set (value) or removed (None)."""
        try:
            scope = parse_entry(entry)
            if value is None:
                self._entries.pop(scope, None)
            else:
                self._entries[scope] = Policy.decode(value)
        except ValueError as e:  # written by something else than the admin API: ignore it, loudly
            log.warning("routing.bad_entry", entry=entry, error=str(e))
            return
        self.table = self._base.overlaid(self._entries)
        log.info("routing.changed", entry=entry, policy=None if value is None else self._entries[scope].to_dict())

    def _on_entry(self, entry: KeyValue.Entry | None) -> None:
        if entry is None:  # the initial values are all in
            self._synced.set()
            return
        deleted = entry.operation in ("DEL", "PURGE") or not entry.value
        self.apply(entry.key, None if deleted else entry.value)
        if entry.delta == 0:
            self._synced.set()


async def _entries(kv: KeyValue) -> AsyncIterator[KeyValue.Entry | None]:
    """Every entry of the bucket, then None once the current ones are in, then every change."""
    watcher = await kv.watchall()
    try:
        async for entry in watcher:
            yield entry
    finally:
        await watcher.stop()
