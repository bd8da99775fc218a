"""Where the ledger keeps its rows: one store interface, SQLite (`SqliteStore`, the default,
`<data dir>/ledger.sqlite`) or PostgreSQL (`broker_api.ledger_pg.PostgresStore`, given a
`postgresql://` URL).

One set of SQL serves both: every statement here is written once with `?` placeholders in the
SQL both engines read (`INSERT ... ON CONFLICT DO NOTHING RETURNING`, `CASE`, keyset paging);
a store only runs it (`_fetch`, `_insert`), PostgreSQL numbering the placeholders. Inserts are
by primary key (job id, event id), so a record delivered twice is stored once. The audit log is
append-only in both: triggers refuse every UPDATE and DELETE (and TRUNCATE in PostgreSQL).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from schemas.errors import InvalidRequestError
from schemas.usage import AuditEvent, UsageRecord

# Types both engines read alike: DOUBLE PRECISION is a REAL in SQLite and a float8 in
# PostgreSQL; token counts are INTEGER so PostgreSQL's SUM of them is a bigint, not a numeric.
TABLES = """
CREATE TABLE IF NOT EXISTS usage (
    job_id TEXT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, day TEXT NOT NULL, org TEXT NOT NULL,
    project TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL, route TEXT NOT NULL, node TEXT NOT NULL,
    attempts INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, cost DOUBLE PRECISION NOT NULL, ttft_ms DOUBLE PRECISION NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL, outcome TEXT NOT NULL, status INTEGER NOT NULL, stream INTEGER NOT NULL,
    counted_by TEXT NOT NULL DEFAULT 'gateway'
);
CREATE INDEX IF NOT EXISTS usage_org_time ON usage (org, time);
CREATE INDEX IF NOT EXISTS usage_time ON usage (time, job_id);
CREATE INDEX IF NOT EXISTS usage_node_time ON usage (node, time);
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, org TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, source TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_org_time ON audit (org, time);
"""
APPEND_ONLY = "the audit log is append-only"

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
    "counted_by",
)
# Columns added after a ledger's first release, each with its default: an older database gains
# them on open (`ALTER TABLE ... ADD COLUMN`), its old rows taking the default.
ADDED_COLUMNS = {"counted_by": "TEXT NOT NULL DEFAULT 'gateway'"}
AUDIT_COLUMNS = ("id", "time", "org", "actor", "action", "target", "source", "detail")
GROUPS = {
    "model": "model",
    "route": "route",
    "key": "key_id",
    "day": "day",
    "org": "org",
    "project": "project",
    "node": "node",
}
INSERT_ROWS = 64  # rows per INSERT statement: few distinct statements, well under either engine's variable cap
IN_LIST = 500  # ids per `IN (...)` of a look-up


class LedgerStore(Protocol):
    """What the ledger role and a ledger-keeping gateway need of a database."""

    async def add_usage(self, records: list[UsageRecord]) -> int: ...
    async def add_audit(self, events: list[AuditEvent]) -> int: ...
    async def usage_page(
        self, *, org: str | None, since: float | None, until: float | None, after: list[Any] | None, limit: int
    ) -> list[dict[str, Any]]: ...
    async def report_page(
        self,
        *,
        org: str | None,
        by: str,
        since: float | None,
        until: float | None,
        after: list[Any] | None,
        limit: int,
    ) -> list[dict[str, Any]]: ...
    async def audit_page(
        self, *, org: str | None, since: float | None, until: float | None, after: list[Any] | None, limit: int
    ) -> list[dict[str, Any]]: ...
    async def series_page(
        self,
        *,
        org: str | None,
        by: str,
        interval: int,
        since: float | None,
        until: float | None,
        after: list[Any] | None,
        limit: int,
    ) -> list[dict[str, Any]]: ...
    async def node_usage_page(self, *, node: str, after: list[Any] | None, limit: int) -> list[dict[str, Any]]: ...
    async def node_totals(self, nodes: list[str]) -> dict[str, dict[str, int]]: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


def usage_row(r: UsageRecord) -> tuple[Any, ...]:
    day = time.strftime("%Y-%m-%d", time.gmtime(r.time))
    return (
        r.job_id,
        r.time,
        day,
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
        r.counted_by,
    )


def audit_row(e: AuditEvent) -> tuple[Any, ...]:
    return (e.id, e.time, e.org, e.actor, e.action, e.target, e.source, json.dumps(e.detail, sort_keys=True))


def group_column(by: str) -> str:
    if by not in GROUPS:
        raise InvalidRequestError(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
    return GROUPS[by]


class SqlStore:
    """The queries, for any engine that runs `_fetch` (rows as maps) and `_insert` (the rows an
    INSERT ... RETURNING returned, committed). `FLOOR` is the one expression the engines spell
    differently: a non-negative number rounded down to an integer."""

    FLOOR = "CAST({} AS INTEGER)"  # SQLite's cast truncates, which for times >= 0 is the floor

    async def _fetch(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def _insert(self, sql: str, args: list[Any]) -> int:
        raise NotImplementedError

    async def _insert_rows(self, table: str, columns: tuple[str, ...], key: str, rows: list[tuple[Any, ...]]) -> int:
        stored = 0
        for start in range(0, len(rows), INSERT_ROWS):
            chunk = rows[start : start + INSERT_ROWS]
            one = f"({', '.join('?' * len(columns))})"
            sql = (
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * len(chunk))} "
                f"ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
            )
            stored += await self._insert(sql, [value for row in chunk for value in row])
        return stored

    async def add_usage(self, records: list[UsageRecord]) -> int:
        """Store the records not stored yet; returns how many were new."""
        return await self._insert_rows("usage", USAGE_COLUMNS, "job_id", [usage_row(r) for r in records])

    async def add_audit(self, events: list[AuditEvent]) -> int:
        return await self._insert_rows("audit", AUDIT_COLUMNS, "id", [audit_row(e) for e in events])

    @staticmethod
    def _where(org: str | None, since: float | None, until: float | None) -> tuple[list[str], list[Any]]:
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
        return clauses, args

    async def _rows_page(
        self,
        table: str,
        key: str,
        *,
        org: str | None,
        since: float | None,
        until: float | None,
        after: list[Any] | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        clauses, args = self._where(org, since, until)
        if after is not None:  # keyset: rows after the last one sent, in (time, key) order
            clauses.append(f"(time > ? OR (time = ? AND {key} > ?))")
            args += [after[0], after[0], after[1]]
        sql = f"SELECT * FROM {table} WHERE {' AND '.join(clauses)} ORDER BY time, {key} LIMIT ?"
        return await self._fetch(sql, [*args, limit])

    async def usage_page(
        self, *, org: str | None, since: float | None, until: float | None, after: list[Any] | None, limit: int
    ) -> list[dict[str, Any]]:
        """Usage rows in (time, job id) order, after the cursor `after` = [time, job id]."""
        return await self._rows_page("usage", "job_id", org=org, since=since, until=until, after=after, limit=limit)

    async def audit_page(
        self, *, org: str | None, since: float | None, until: float | None, after: list[Any] | None, limit: int
    ) -> list[dict[str, Any]]:
        """Audit rows in (time, id) order after `after` = [time, id], each `detail` a map again."""
        rows = await self._rows_page("audit", "id", org=org, since=since, until=until, after=after, limit=limit)
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows

    async def report_page(
        self,
        *,
        org: str | None,
        by: str,
        since: float | None,
        until: float | None,
        after: list[Any] | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Totals per value of `by`, in that value's order, after `after` = [value]."""
        column = group_column(by)
        clauses, args = self._where(org, since, until)
        if after is not None:
            clauses.append(f"{column} > ?")
            args.append(after[0])
        sql = (
            f'SELECT {column} AS "{by}", COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, '
            "SUM(completion_tokens) AS completion_tokens, SUM(cached_tokens) AS cached_tokens, SUM(cost) AS cost, "
            "SUM(CASE WHEN outcome = 'error' THEN 1 ELSE 0 END) AS errors, "
            "SUM(CASE WHEN outcome = 'cached' THEN 1 ELSE 0 END) AS cache_hits, "
            "AVG(NULLIF(ttft_ms, 0)) AS avg_ttft_ms "
            f"FROM usage WHERE {' AND '.join(clauses)} GROUP BY {column} ORDER BY {column} LIMIT ?"
        )
        rows = await self._fetch(sql, [*args, limit])
        for row in rows:  # rounded here, alike for both engines (PostgreSQL rounds only numerics)
            row["cost"] = round(float(row["cost"] or 0.0), 10)
            if row["avg_ttft_ms"] is not None:
                row["avg_ttft_ms"] = round(float(row["avg_ttft_ms"]), 3)
        return rows

    async def series_page(
        self,
        *,
        org: str | None,
        by: str,
        interval: int,
        since: float | None,
        until: float | None,
        after: list[Any] | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Usage over time: one row per `interval`-second bucket (`t`, its start as unix time)
        and group, with requests, tokens and cost, in (t, group) order after `after` = [t, group];
        buckets with no requests are left out."""
        column = group_column(by)
        clauses, args = self._where(org, since, until)
        outer, outer_args = "1=1", []
        if after is not None:
            outer = f"(t > ? OR (t = ? AND {column} > ?))"
            outer_args = [after[0], after[0], after[1]]
        bucket = self.FLOOR.format("time / ?")
        sql = (
            f'SELECT t, {column} AS "{by}", COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, '
            "SUM(completion_tokens) AS completion_tokens, SUM(cost) AS cost, "
            "SUM(CASE WHEN outcome = 'error' THEN 1 ELSE 0 END) AS errors "
            f"FROM (SELECT {bucket} * ? AS t, {column}, prompt_tokens, completion_tokens, cost, outcome "
            f"FROM usage WHERE {' AND '.join(clauses)}) AS u WHERE {outer} "
            f"GROUP BY t, {column} ORDER BY t, {column} LIMIT ?"
        )
        rows = await self._fetch(sql, [float(interval), interval, *args, *outer_args, limit])
        for row in rows:
            row["t"] = int(row["t"])
            row["cost"] = round(float(row["cost"] or 0.0), 10)
        return rows

    async def node_usage_page(self, *, node: str, after: list[Any] | None, limit: int) -> list[dict[str, Any]]:
        """What one node served (its winning attempts), by day and model, after `after` = [day, model]."""
        keyset, args = "", [node]
        if after is not None:
            keyset = " AND (day > ? OR (day = ? AND model > ?))"
            args += [after[0], after[0], after[1]]
        sql = (
            "SELECT day, model, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, "
            "SUM(completion_tokens) AS completion_tokens, SUM(cost) AS cost "
            f"FROM usage WHERE node = ?{keyset} GROUP BY day, model ORDER BY day, model LIMIT ?"
        )
        rows = await self._fetch(sql, [*args, limit])
        for row in rows:
            row["cost"] = round(float(row["cost"] or 0.0), 10)
        return rows

    async def node_totals(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        """Requests and tokens (prompt + completion) each of these nodes served."""
        out: dict[str, dict[str, int]] = {}
        for start in range(0, len(nodes), IN_LIST):
            chunk = nodes[start : start + IN_LIST]
            sql = (
                "SELECT node, COUNT(*) AS requests, SUM(prompt_tokens + completion_tokens) AS tokens "
                f"FROM usage WHERE node IN ({', '.join('?' * len(chunk))}) GROUP BY node"
            )
            for row in await self._fetch(sql, list(chunk)):
                out[row["node"]] = {"requests": int(row["requests"]), "tokens": int(row["tokens"] or 0)}
        return out


SQLITE_APPEND_ONLY = f"""
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END;
"""


class SqliteStore(SqlStore):
    """The embedded default: one file, WAL journal, one connection (aiosqlite's thread)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: str | Path) -> SqliteStore:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path))
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.executescript(TABLES + SQLITE_APPEND_ONLY)
        async with db.execute("PRAGMA table_info(usage)") as cur:
            have = {row["name"] for row in await cur.fetchall()}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                await db.execute(f"ALTER TABLE usage ADD COLUMN {column} {kind}")
        await db.commit()
        return cls(db)

    async def _fetch(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        async with self._db.execute(sql, args) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def _insert(self, sql: str, args: list[Any]) -> int:
        rows = await self._db.execute_fetchall(sql, args)
        await self._db.commit()
        return len(list(rows))

    async def ping(self) -> None:
        await self._fetch("SELECT 1", [])

    async def close(self) -> None:
        await self._db.close()


async def open_store(database_url: str, data_dir: str | Path) -> LedgerStore:
    """PostgreSQL for a `postgresql://` (or `postgres://`) URL, else SQLite in `data_dir`."""
    if database_url.startswith(("postgresql://", "postgres://")):
        from broker_api.ledger_pg import PostgresStore  # asyncpg comes with the `postgres` extra

        return await PostgresStore.open(database_url)
    if database_url:
        raise ValueError(f"unsupported database URL {database_url.split(':', 1)[0]!r}: use postgresql://...")
    return await SqliteStore.open(Path(data_dir) / "ledger.sqlite")
