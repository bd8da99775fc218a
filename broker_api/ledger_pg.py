"""The ledger on PostgreSQL, through asyncpg (the `postgres` extra).

asyncpg rather than psycopg 3: it is asyncio-native (no thread or libpq underneath), speaks
the binary protocol, prepares and caches each statement, and keeps a pool that replaces broken
connections by itself: after a database restart the next `acquire` simply connects again. The
SQL is `broker_api.ledger_store`'s, with its `?` placeholders numbered `$1, $2, ...`.

Several ledgers may share one database (and one durable consumer name, splitting the records
between them); the schema is made under an advisory lock, so they can start at once.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from broker_api.ledger_store import ADDED_COLUMNS, APPEND_ONLY, TABLES, SqlStore

SCHEMA_LOCK = 0x7479_6C65_6467  # pg_advisory_xact_lock key: "tyledg"
PG_APPEND_ONLY = f"""
CREATE OR REPLACE FUNCTION ty_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '{APPEND_ONLY}';
END $$;
CREATE OR REPLACE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION ty_audit_append_only();
CREATE OR REPLACE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION ty_audit_append_only();
"""
_PLACEHOLDER = re.compile(r"\?")
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0


def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...` (the shared SQL has no `?` elsewhere)."""
    count = 0

    def number(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


class PostgresStore(SqlStore):
    FLOOR = "CAST(FLOOR({}) AS BIGINT)"  # PostgreSQL's cast rounds to the nearest

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=4, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT
        )
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(TABLES + PG_APPEND_ONLY)
            for column, kind in ADDED_COLUMNS.items():
                await conn.execute(f"ALTER TABLE usage ADD COLUMN IF NOT EXISTS {column} {kind}")
        return cls(pool)

    async def _fetch(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(row) for row in await conn.fetch(numbered(sql), *args)]

    async def _insert(self, sql: str, args: list[Any]) -> int:
        async with self._pool.acquire() as conn:
            return len(await conn.fetch(numbered(sql), *args))

    async def ping(self) -> None:
        async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        await self._pool.close()
