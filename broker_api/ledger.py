"""The ledger: one row per job (usage and cost) and the append-only audit log.

Rows arrive through JetStream (`TY_USAGE`, `TY_AUDIT`), published by whichever gateway served
the job or took the action. `LedgerFeed` reads both streams with a durable consumer per ledger
name and stores them by primary key (job id, event id), so a redelivered or republished record
is stored once: exactly one row per job, however many gateways there are. A batch is acked
only once it is stored; while the database is away the feed keeps retrying the same batch
(and tells JetStream it is still at it), so the records wait in the stream, in order.

The ledger runs as its own role (`tokenyard ledger`, `broker_api.ledger_main`), on SQLite or
PostgreSQL (`broker_api.ledger_store`); a gateway started with `--ledger` keeps one in process
instead. Reports are SQL over it: `Ledger` reads a store directly, `broker_api.ledger_query.
LedgerClient` asks the ledger role over NATS; both are a `LedgerReader`.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker_api.ledger_store import LedgerStore, SqliteStore
from schemas import subjects
from schemas.jetstream import consume, decode_batch
from schemas.usage import AuditEvent, UsageRecord

log = structlog.get_logger(__name__)

BATCH = 256
GATHER = 0.2  # seconds records gather before a batch is written: fewer, larger transactions
ACK_WAIT = 30.0  # seconds JetStream waits for a batch's acks before delivering it again (a killed ledger's)
RETRY = (0.2, 5.0)  # back-off between attempts to store a batch while the database is away
MAX_GROUPS = 100_000  # rows of a grouped report
SERIES_ROWS = 50_000  # a usage series' row cap (buckets x groups)
NODE_ROWS = 10_000  # one node's (day, model) rows


class LedgerReader(Protocol):
    """What the admin API reads: usage rows, grouped totals and the audit log of an org (None:
    every org), in a time window."""

    async def usage(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]: ...

    async def report(
        self, *, org: str | None, by: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]: ...

    async def audit(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]: ...

    async def series(
        self, *, org: str | None, by: str, interval: int, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]: ...

    async def node_usage(self, node: str) -> list[dict[str, Any]]: ...

    async def node_totals(self, nodes: list[str]) -> dict[str, dict[str, int]]: ...


class Ledger:
    """A store, read directly (the ledger role itself, or a gateway that keeps a ledger)."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, path: str | Path) -> Ledger:
        """A ledger on the SQLite file at `path`."""
        return cls(await SqliteStore.open(path))

    async def close(self) -> None:
        await self.store.close()

    async def add_usage(self, records: list[UsageRecord]) -> int:
        return await self.store.add_usage(records)

    async def add_audit(self, events: list[AuditEvent]) -> int:
        return await self.store.add_audit(events)

    async def usage(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        return await self.store.usage_page(org=org, since=since, until=until, after=None, limit=limit)

    async def report(
        self, *, org: str | None, by: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        return await self.store.report_page(org=org, by=by, since=since, until=until, after=None, limit=MAX_GROUPS)

    async def audit(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        return await self.store.audit_page(org=org, since=since, until=until, after=None, limit=limit)

    async def series(
        self, *, org: str | None, by: str, interval: int, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        return await self.store.series_page(
            org=org, by=by, interval=interval, since=since, until=until, after=None, limit=SERIES_ROWS
        )

    async def node_usage(self, node: str) -> list[dict[str, Any]]:
        return await self.store.node_usage_page(node=node, after=None, limit=NODE_ROWS)

    async def node_totals(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        return await self.store.node_totals(nodes)


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


class LedgerFeed:
    """Moves usage and audit records from JetStream into a store, exactly once per id."""

    def __init__(
        self, js: JetStreamContext, store: LedgerStore | Ledger, *, name: str, ack_wait: float = ACK_WAIT
    ) -> None:
        self._js = js
        self._store = store
        self.name = name
        self._ack_wait = ack_wait
        self._retry_max = min(RETRY[1], ack_wait / 2)  # "still at it" reaches JetStream before the ack wait ends
        self.stored = {"usage": 0, "audit": 0}  # rows this process stored (new ones, not duplicates)
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = 0

    @property
    def durables(self) -> dict[str, tuple[str, str]]:
        """{table: (stream, durable consumer)} this feed reads (its lag is their pending count)."""
        return {
            "usage": (subjects.USAGE_STREAM, subjects.ledger_consumer(self.name)),
            "audit": (subjects.AUDIT_STREAM, subjects.ledger_audit_consumer(self.name)),
        }

    @property
    def running(self) -> bool:
        """Both consumers subscribed and their loops alive."""
        return self._subscribed == len(self._tasks) > 0 and not any(t.done() for t in self._tasks)

    async def start(self) -> None:
        (us, ud), (as_, ad) = self.durables["usage"], self.durables["audit"]
        self._tasks = [
            asyncio.create_task(self._follow(us, ud, UsageRecord.decode, self._store.add_usage, "usage")),
            asyncio.create_task(self._follow(as_, ad, AuditEvent.decode, self._store.add_audit, "audit")),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(
        self,
        stream: str,
        durable: str,
        decode: Callable[[bytes], Any],
        store: Callable[[list[Any]], Awaitable[int]],
        table: str,
    ) -> None:
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,  # each record acked once stored: ledgers may share a durable
            ack_wait=self._ack_wait,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=BATCH * 4,
        )
        psub = await self._js.pull_subscribe("", durable=durable, stream=stream, config=config)
        self._subscribed += 1

        async def handle(msgs: list[Msg]) -> None:
            records = [record for _, record in await decode_batch(msgs, decode, name=durable)]
            if records:
                self.stored[table] += await self._store_until_done(records, msgs, store, durable)
            for msg in msgs:  # every ack a publish, pipelined; an old durable acks ALL, which this also satisfies
                await msg.ack()

        await consume(psub, handle, name=durable, batch=BATCH, wait=0.2, gather=GATHER)

    async def _store_until_done(
        self, records: list[Any], msgs: list[Msg], store: Callable[[list[Any]], Awaitable[int]], durable: str
    ) -> int:
        """Store a batch, retrying while the database is away; until then the messages stay
        unacked (and kept from redelivery), so nothing is lost and the order holds."""
        pause = RETRY[0]
        while True:
            try:
                return await store(records)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # top of a retry loop: the database is down or restarting
                log.warning("ledger.store_failed", consumer=durable, records=len(records), error=repr(e))
            await asyncio.sleep(pause)
            pause = min(self._retry_max, pause * 2)
            for msg in msgs:
                await msg.in_progress()
