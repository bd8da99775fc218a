"""The ledger: one row per job (usage and cost) and the append-only audit log, in SQLite.

Rows arrive through JetStream (`TY_USAGE`, `TY_AUDIT`), published by whichever gateway served
the job or took the action. Each ledger reads both streams with its own durable consumer and
inserts by primary key (job id, event id), so a redelivered or republished record is stored
once: exactly one row per job, however many gateways there are. Reports are SQL over it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import subjects
from schemas.errors import InvalidRequestError
from schemas.jetstream import consume, decode_batch
from schemas.usage import AuditEvent, UsageRecord

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    job_id TEXT PRIMARY KEY, time REAL NOT NULL, day TEXT NOT NULL, org TEXT NOT NULL, project TEXT NOT NULL,
    key_id TEXT NOT NULL, model TEXT NOT NULL, route TEXT NOT NULL, node TEXT NOT NULL, attempts INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    cost REAL NOT NULL, ttft_ms REAL NOT NULL, duration_ms REAL NOT NULL, outcome TEXT NOT NULL,
    status INTEGER NOT NULL, stream INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_org_time ON usage (org, time);
CREATE INDEX IF NOT EXISTS usage_node_time ON usage (node, time);
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY, time REAL NOT NULL, org TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, source TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_org_time ON audit (org, time);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

USAGE_COLUMNS = (
    "job_id",
    "time",
    "day",
    "org",
    "project",
    "key_id",
    "model",
    "route",
    "node",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost",
    "ttft_ms",
    "duration_ms",
    "outcome",
    "status",
    "stream",
)
GROUPS = {"model": "model", "route": "route", "key": "key_id", "day": "day", "org": "org", "project": "project"}
BATCH = 256
SERIES_ROWS = 50_000  # a usage series' row cap (buckets x groups)
GATHER = 0.2  # seconds records gather before a batch is written: fewer, larger transactions


class Ledger:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: str | Path) -> Ledger:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path))
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.executescript(SCHEMA)
        await db.commit()
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def add_usage(self, records: list[UsageRecord]) -> int:
        rows = [
            (
                r.job_id,
                r.time,
                time.strftime("%Y-%m-%d", time.gmtime(r.time)),
                r.org,
                r.project,
                r.key_id,
                r.model,
                r.route,
                r.node,
                r.attempts,
                r.prompt_tokens,
                r.completion_tokens,
                r.cached_tokens,
                r.cost,
                r.ttft_ms,
                r.duration_ms,
                r.outcome,
                r.status,
                int(r.stream),
            )
            for r in records
        ]
        before = self._db.total_changes
        await self._db.executemany(
            f"INSERT OR IGNORE INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({', '.join('?' * len(USAGE_COLUMNS))})",
            rows,
        )
        await self._db.commit()
        return self._db.total_changes - before

    async def add_audit(self, events: list[AuditEvent]) -> int:
        before = self._db.total_changes
        await self._db.executemany(
            "INSERT OR IGNORE INTO audit (id, time, org, actor, action, target, source, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (e.id, e.time, e.org, e.actor, e.action, e.target, e.source, json.dumps(e.detail, sort_keys=True))
                for e in events
            ],
        )
        await self._db.commit()
        return self._db.total_changes - before

    @staticmethod
    def _where(org: str | None, since: float | None, until: float | None) -> tuple[str, list[Any]]:
        clauses: list[str] = ["1=1"]
        args: list[Any] = []
        if org is not None:
            clauses.append("org = ?")
            args.append(org)
        if since is not None:
            clauses.append("time >= ?")
            args.append(since)
        if until is not None:
            clauses.append("time < ?")
            args.append(until)
        return " AND ".join(clauses), args

    async def usage(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        where, args = self._where(org, since, until)
        async with self._db.execute(f"SELECT * FROM usage WHERE {where} ORDER BY time LIMIT ?", [*args, limit]) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def report(
        self, *, org: str | None, by: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        if by not in GROUPS:
            raise InvalidRequestError(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
        column = GROUPS[by]
        where, args = self._where(org, since, until)
        sql = (
            f"SELECT {column} AS {by}, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, "
            "SUM(completion_tokens) AS completion_tokens, SUM(cached_tokens) AS cached_tokens, "
            "ROUND(SUM(cost), 10) AS cost, SUM(outcome = 'error') AS errors, SUM(outcome = 'cached') AS cache_hits, "
            "ROUND(AVG(NULLIF(ttft_ms, 0)), 3) AS avg_ttft_ms "
            f"FROM usage WHERE {where} GROUP BY {column} ORDER BY {column}"
        )
        async with self._db.execute(sql, args) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def series(
        self, *, org: str | None, by: str, interval: int, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Usage over time: one row per `interval`-second bucket (`t`, its start as unix time) and
        group, with requests, tokens and cost; buckets with no requests are left out."""
        if by not in GROUPS:
            raise InvalidRequestError(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
        column = GROUPS[by]
        where, args = self._where(org, since, until)
        sql = (
            f"SELECT CAST(time / ? AS INTEGER) * ? AS t, {column} AS {by}, COUNT(*) AS requests, "
            "SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, "
            "ROUND(SUM(cost), 10) AS cost, SUM(outcome = 'error') AS errors "
            f"FROM usage WHERE {where} GROUP BY t, {column} ORDER BY t, {column} LIMIT ?"
        )
        async with self._db.execute(sql, [interval, interval, *args, SERIES_ROWS]) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def node_usage(self, node: str) -> list[dict[str, Any]]:
        """What one node served (its winning attempts), by model and day."""
        sql = (
            "SELECT day, model, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, "
            "SUM(completion_tokens) AS completion_tokens, ROUND(SUM(cost), 10) AS cost "
            "FROM usage WHERE node = ? GROUP BY day, model ORDER BY day, model"
        )
        async with self._db.execute(sql, [node]) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def node_totals(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        """Requests and tokens (prompt + completion) each of these nodes served."""
        marks = ", ".join("?" * len(nodes))
        sql = (
            "SELECT node, COUNT(*) AS requests, SUM(prompt_tokens + completion_tokens) AS tokens "
            f"FROM usage WHERE node IN ({marks}) GROUP BY node"
        )
        async with self._db.execute(sql, nodes) as cur:
            return {
                row["node"]: {"requests": row["requests"], "tokens": row["tokens"] or 0} for row in await cur.fetchall()
            }

    async def audit(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        where, args = self._where(org, since, until)
        async with self._db.execute(f"SELECT * FROM audit WHERE {where} ORDER BY time LIMIT ?", [*args, limit]) as cur:
            rows = [dict(row) for row in await cur.fetchall()]
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


class LedgerFeed:
    """Moves usage and audit records from JetStream into the ledger, exactly once per id."""

    def __init__(self, js: JetStreamContext, ledger: Ledger, *, name: str) -> None:
        self._js = js
        self._ledger = ledger
        self._name = name
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def durables(self) -> dict[str, tuple[str, str]]:
        """{what: (stream, durable consumer)} this feed reads (its lag is their pending count)."""
        return {
            "usage": (subjects.USAGE_STREAM, f"ledger-{self._name}"),
            "audit": (subjects.AUDIT_STREAM, f"audit-{self._name}"),
        }

    async def start(self) -> None:
        (usage_stream, usage), (audit_stream, audit) = self.durables["usage"], self.durables["audit"]
        self._tasks = [
            asyncio.create_task(self._follow(usage_stream, usage, UsageRecord.decode, self._ledger.add_usage)),
            asyncio.create_task(self._follow(audit_stream, audit, AuditEvent.decode, self._ledger.add_audit)),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(
        self, stream: str, durable: str, decode: Callable[[bytes], Any], store: Callable[[list[Any]], Awaitable[int]]
    ) -> None:
        # One reader per durable, in order: acknowledging a batch's last message acknowledges all of it.
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.ALL,
            ack_wait=60,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=BATCH * 4,
        )
        psub = await self._js.pull_subscribe("", durable=durable, stream=stream, config=config)

        async def handle(msgs: list[Msg]) -> None:
            records = [record for _, record in await decode_batch(msgs, decode, name=durable)]
            await store(records)  # if it raises, nothing is acked: JetStream delivers them again
            if msgs:
                await msgs[-1].ack()

        await consume(psub, handle, name=durable, batch=BATCH, wait=0.2, gather=GATHER)
