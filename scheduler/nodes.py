"""Which adverts the scheduler believes: enrolled nodes only within their enrolment.

Every scheduler follows the node registry bucket (`schemas.streams.NODES`) into memory. An
advert from an enrolled node is used only as `schemas.registry.admit_advert` allows (its enrolled
pool, kind and models, while enabled, at the registry's prices), and never for a pool that an
operator's cloud adapter serves; so a rogue advert cannot attract jobs, even where NATS
permissions would let it through (an operator running NATS without authentication). Adverts of
nodes the registry does not know are the operator's own workers and adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import nats.errors
import structlog
from nats.js.kv import KeyValue

from schemas import streams
from schemas.codec import WireError
from schemas.jetstream import follow
from schemas.jobs import NodeAdvert
from schemas.registry import NodeRecord, admit_advert

log = structlog.get_logger(__name__)

SYNC_TIMEOUT = 10.0


class NodeGate:
    def __init__(self, kv: KeyValue, *, on_revoked: Callable[[str], None]) -> None:
        self._kv = kv
        self._on_revoked = on_revoked  # a node lost its right to serve: forget it at once
        self.records: dict[str, NodeRecord] = {}
        self._cloud: set[str] = set()  # pools some operator adapter (kind cloud) advertised
        self._task: asyncio.Task[None] | None = None
        self._ignored: set[str] = set()  # nodes whose refusal was logged
        self._synced = asyncio.Event()

    async def start(self) -> None:
        """Follow the registry; returns once its current records are in (until then an enrolled
        node would pass for an operator's)."""
        self._task = asyncio.create_task(follow(self._entries, self._apply, name=streams.NODES.bucket))
        await asyncio.wait_for(self._synced.wait(), SYNC_TIMEOUT)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _entries(self) -> AsyncIterator[KeyValue.Entry | None]:
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                yield entry
        finally:
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()

    def _apply(self, entry: KeyValue.Entry | None) -> None:
        if entry is None:  # the current entries are all in
            self._synced.set()
            return
        if entry.delta == 0:
            self._synced.set()
        if entry.operation in ("DEL", "PURGE") or entry.value is None:
            self.records.pop(entry.key, None)
            return
        try:
            record = NodeRecord.decode(entry.value)
        except WireError as e:
            log.error("fleet.bad_node_record", node=entry.key, error=str(e))
            return
        self.records[record.id] = record
        self._ignored.discard(record.id)
        if record.revoked:
            self._on_revoked(record.id)

    def admit(self, advert: NodeAdvert) -> NodeAdvert | None:
        """The advert as placement may use it, or None."""
        record = self.records.get(advert.node)
        if record is None:
            if advert.kind == "cloud":
                self._cloud.add(advert.pool)
            return advert
        admitted = admit_advert(advert, record) if advert.pool not in self._cloud else None
        if admitted is None and advert.node not in self._ignored:
            self._ignored.add(advert.node)
            log.warning("fleet.advert_refused", node=advert.node, pool=advert.pool, kind=advert.kind)
        return admitted
