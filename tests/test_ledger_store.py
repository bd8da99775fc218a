"""The ledger's two stores answer alike: the same records in SQLite and in a real PostgreSQL give
the same rows for every query (export, grouped report, series, a node's usage and totals, the
audit log), page by page as the ledger role serves them, with every row once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from broker_api.ledger_pg import PostgresStore
from broker_api.ledger_query import answer_page
from broker_api.ledger_store import LedgerStore, SqliteStore
from schemas.ledger import LedgerQuery
from schemas.usage import AuditEvent, UsageRecord

T0 = 1_700_000_000.0


def records(n: int) -> list[UsageRecord]:
    return [
        UsageRecord(
            job_id=f"j{i:05d}",
            time=T0 + i * 37.5,  # several per minute bucket, some exactly on a boundary
            org=f"org{i % 3}",
            project="p" if i % 2 else "",
            key_id=f"k{i % 5}",
            model=("m-a", "m-b")[i % 2],
            route="own",
            node=f"n{i % 4}",
            attempts=1 + i % 2,
            prompt_tokens=10 + i % 7,
            completion_tokens=i % 13,
            cached_tokens=0,
            cost=0.0001 * (i % 9),
            ttft_ms=float(i % 5),
            duration_ms=20.0,
            outcome=("ok", "error", "cached")[i % 3],  # type: ignore[arg-type]
            stream=bool(i % 2),
        )
        for i in range(n)
    ]


async def pages(store: LedgerStore, query: LedgerQuery) -> list[dict[str, Any]]:
    """Every row of `query`, asked for in small pages the way LedgerClient asks."""
    rows: list[dict[str, Any]] = []
    after = None
    for _ in range(1000):
        page = await answer_page(store, dataclasses.replace(query, after=after, limit=min(query.limit - len(rows), 7)))
        rows += page.rows
        after = page.after
        if after is None or len(rows) >= query.limit:
            return rows
    raise AssertionError("paging did not end")


QUERIES = [
    LedgerQuery(kind="usage", limit=10_000),
    LedgerQuery(kind="usage", org="org1", since=T0 + 100, until=T0 + 2000, limit=10_000),
    LedgerQuery(kind="usage", limit=25),
    *(LedgerQuery(kind="report", by=by, limit=10_000) for by in ("model", "route", "key", "day", "org", "node")),
    LedgerQuery(kind="report", by="key", org="org2", limit=10_000),
    LedgerQuery(kind="series", by="model", interval=60, limit=10_000),
    LedgerQuery(kind="series", by="node", interval=3600, org="org0", limit=10_000),
    LedgerQuery(kind="node_usage", node="n1", limit=10_000),
    LedgerQuery(kind="audit", limit=10_000),
    LedgerQuery(kind="audit", org="o1", limit=3),
]


@pytest.fixture
async def both(tmp_path: Path, database_url: str) -> Any:
    stores: list[LedgerStore] = [
        await SqliteStore.open(tmp_path / "ledger.sqlite"),
        await PostgresStore.open(database_url),
    ]
    usage = records(120)
    events = [AuditEvent(id=f"e{i}", time=T0 + i, org=f"o{i % 2}", actor="a", action="x", target="t", source="s",
                         detail={"i": i}) for i in range(10)]  # fmt: skip
    for store in stores:
        assert await store.add_usage(usage) == 120
        assert await store.add_usage(usage[:30]) == 0  # a redelivery stores nothing
        assert await store.add_audit(events + events) == 10
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: f"{q.kind}-{q.by}-{q.org}-{q.limit}")
async def test_sqlite_and_postgres_answer_alike(both: list[LedgerStore], query: LedgerQuery) -> None:
    sqlite_rows, pg_rows = [await pages(store, query) for store in both]
    assert sqlite_rows == pg_rows
    assert sqlite_rows, "a query that matched nothing proves little"
    if query.kind == "usage":
        assert len({r["job_id"] for r in sqlite_rows}) == len(sqlite_rows)
        if query.org is None and query.limit > 120:
            assert len(sqlite_rows) == 120
    if query.kind == "report":
        assert sum(r["requests"] for r in sqlite_rows) == (120 if query.org is None else 40)


async def test_node_totals_alike(both: list[LedgerStore]) -> None:
    sqlite_totals, pg_totals = [await store.node_totals(["n0", "n1", "n3", "nobody"]) for store in both]
    assert sqlite_totals == pg_totals and set(sqlite_totals) == {"n0", "n1", "n3"}
    assert sum(t["requests"] for t in sqlite_totals.values()) == 90
