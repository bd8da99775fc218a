"""The routing table a scheduler places by: `--routing-file` overlaid with what operators set
through the admin API (`ROUTING_BUCKET`, watched, so every scheduler applies a change to its
next placement without a restart)."""

from __future__ import annotations

import asyncio
import contextlib

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from scheduler.routing import RoutingTable
from schemas import subjects
from schemas.routing import HISTORY, Policy, parse_entry

log = structlog.get_logger(__name__)

SYNC_TIMEOUT = 10.0


class RoutingStore:
    def __init__(self, base: RoutingTable) -> None:
        self._base = base
        self._entries: dict[tuple[str, str], Policy] = {}
        self.table = base
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    async def start(self, js: JetStreamContext, replicas: int = 1) -> None:
        config = KeyValueConfig(
            bucket=subjects.ROUTING_BUCKET, history=HISTORY, storage=StorageType.FILE, replicas=replicas
        )
        try:
            kv = await js.create_key_value(config)
        except nats.js.errors.BadRequestError:  # made by a gateway or another scheduler
            kv = await js.key_value(subjects.ROUTING_BUCKET)
        self._task = asyncio.create_task(self._follow(kv))
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

    async def _follow(self, kv: KeyValue) -> None:
        for attempt in range(10**9):  # re-watch after a broken watch, with a bounded back-off
            try:
                async for entry in await kv.watchall():
                    if entry is None:  # the initial values are all in
                        self._synced.set()
                        continue
                    deleted = entry.operation in ("DEL", "PURGE") or not entry.value
                    self.apply(entry.key, None if deleted else entry.value)
                    if entry.delta == 0:
                        self._synced.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # top of a loop: placements go on with the last table
                log.exception("routing.watch_failed")
            await asyncio.sleep(min(5.0, 0.2 * (attempt + 1)))  # ended or failed: watch again, not at once
