"""The ledger as its own role (`tokenyard ledger`), on SQLite and on a real PostgreSQL server:
one row per job across a SIGKILL of the ledger mid-load and a restart of the database mid-load
(the records wait in JetStream meanwhile); reports that any gateway answers from the ledger
role, none keeping a ledger of its own, paged so a big export never nears NATS's 1 MiB limit;
the audit log append-only in PostgreSQL too; /metrics, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client as NATS

from schemas import streams, subjects
from schemas.jetstream import ensure
from schemas.usage import AuditEvent, UsageRecord
from tests.helpers import ECHO
from tests.postgres import Postgres
from tests.stack import Proc, Stack, auth_headers

LEDGER_ENV = {"TOKENYARD_LEDGER_ACK_WAIT": "2", "TOKENYARD_FLEET_EVENTS": "false"}


def record(i: int, *, org: str = "org_load") -> UsageRecord:
    return UsageRecord(
        job_id=f"job-{i:06d}",
        time=1_700_000_000.0 + i,
        org=org,
        project="",
        key_id=f"key-{i % 7}",
        model="m",
        route="own",
        node="n1",
        attempts=1,
        prompt_tokens=3,
        completion_tokens=i % 11,
        cached_tokens=0,
        cost=0.0,
        ttft_ms=1.0,
        duration_ms=2.0,
        outcome="ok",
    )


async def publish(nc: NATS, first: int, count: int, *, pace: float = 0.0) -> None:
    """Usage records as gateways publish them (message id = job id), `pace` seconds per 100."""
    js = nc.jetstream()
    for start in range(first, first + count, 100):
        batch = [record(i) for i in range(start, min(start + 100, first + count))]
        await asyncio.gather(
            *(
                js.publish(subjects.usage_subject(r.job_id), r.encode(), headers={"Nats-Msg-Id": r.job_id})
                for r in batch
            )
        )
        if pace:
            await asyncio.sleep(pace)


class Rows:
    """The ledger's usage table, read straight from its database."""

    def __init__(self, sqlite_path: Path | None = None, url: str = "") -> None:
        self.sqlite_path = sqlite_path
        self.url = url

    async def read(self) -> tuple[int, int, int]:
        """(rows, distinct job ids, sum of completion tokens); zeros before the table exists."""
        sql = "SELECT COUNT(*), COUNT(DISTINCT job_id), COALESCE(SUM(completion_tokens), 0) FROM usage"
        try:
            if self.url:
                conn = await asyncpg.connect(self.url, timeout=2)
                try:
                    row = await conn.fetchrow(sql)
                finally:
                    await conn.close()
                return int(row[0]), int(row[1]), int(row[2])
            assert self.sqlite_path is not None
            with sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=5) as db:
                count, distinct, tokens = db.execute(sql).fetchone()
            return int(count), int(distinct), int(tokens)
        except (OSError, sqlite3.OperationalError, asyncpg.PostgresError):
            return 0, 0, 0

    async def wait_for(self, at_least: int, timeout: float = 60.0) -> tuple[int, int, int]:
        deadline = time.monotonic() + timeout
        while True:
            got = await self.read()
            if got[0] >= at_least:
                return got
            assert time.monotonic() < deadline, f"the ledger holds {got[0]} rows, not {at_least}"
            await asyncio.sleep(0.1)


def expected(count: int) -> tuple[int, int, int]:
    return count, count, sum(i % 11 for i in range(count))


async def wait_ready(metrics_url: str, *, ready: bool = True, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=metrics_url, timeout=3) as http:
        while True:
            try:
                if ((await http.get("/readyz")).status_code == 200) == ready:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the ledger's /readyz did not say ready={ready}"
            await asyncio.sleep(0.1)


async def ledger_stack(tmp: Path) -> Stack:
    stack = Stack(tmp, sync_always=True)
    stack.start_nats()
    nc = await stack.bus()
    await ensure(nc, streams.USAGE)
    await ensure(nc, streams.AUDIT)
    return stack


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_one_row_per_job_across_a_ledger_kill(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = await request.getfixturevalue("postgres").create_database() if backend == "postgres" else ""
    rows = Rows(url=url) if url else Rows(sqlite_path=tmp_path / "ledger" / "ledger.sqlite")
    env = {**LEDGER_ENV, "TOKENYARD_DATABASE_URL": url}
    stack = await ledger_stack(tmp_path)
    try:
        ledger, metrics = stack.start_ledger(**env)
        await wait_ready(metrics)
        nc = await stack.bus()
        load = asyncio.create_task(publish(nc, 0, 3000, pace=0.03))
        await rows.wait_for(600)  # mid-load
        ledger.kill()  # SIGKILL: a batch may be stored and not acked, or delivered and not stored
        killed_at = (await rows.read())[0]
        assert killed_at < 3000, "the load was over before the kill"
        await asyncio.sleep(0.5)
        ledger, metrics = stack.start_ledger(**env)
        await load
        await publish(nc, 0, 200)  # republished after the dedupe window would be: still one row each
        got = await rows.wait_for(3000)
        await asyncio.sleep(2.5)  # past the ack wait: any late redelivery has landed by now
        assert await rows.read() == expected(3000), f"killed at {killed_at} rows, then {got}"
        async with httpx.AsyncClient(base_url=metrics, timeout=5) as http:
            text = (await http.get("/metrics")).text
        assert f'tokenyard_ledger_lag_records{{stream="{subjects.USAGE_STREAM}"}} 0' in text
        assert 'tokenyard_ledger_rows_stored_total{table="usage"}' in text
        assert ledger.alive()
    finally:
        await stack.close()


async def test_one_row_per_job_across_a_database_restart(tmp_path: Path, postgres: Postgres) -> None:
    url = await postgres.create_database()
    rows = Rows(url=url)
    stack = await ledger_stack(tmp_path)
    try:
        ledger, metrics = stack.start_ledger(**LEDGER_ENV, TOKENYARD_DATABASE_URL=url)
        await wait_ready(metrics)
        nc = await stack.bus()
        load = asyncio.create_task(publish(nc, 0, 3000, pace=0.03))
        await rows.wait_for(600)
        postgres.stop("immediate")  # like a crash of the database server
        try:
            await wait_ready(metrics, ready=False)  # the ledger says so...
            await asyncio.sleep(1.5)
            info = await nc.jetstream().consumer_info(subjects.USAGE_STREAM, subjects.ledger_consumer("main"))
            assert info.num_pending + info.num_ack_pending > 0  # ...and the records wait in JetStream
        finally:
            postgres.start()
        await load
        await rows.wait_for(3000)
        await wait_ready(metrics)
        await asyncio.sleep(2.5)
        assert await rows.read() == expected(3000)
        assert ledger.alive()  # it reconnected; it did not die and come back
    finally:
        await stack.close()


async def test_postgres_audit_log_is_append_only(database_url: str) -> None:
    from broker_api.ledger_pg import PostgresStore

    store = await PostgresStore.open(database_url)
    try:
        event = AuditEvent(id="e1", time=1.0, org="o", actor="a", action="key.create", target="k", source="s")
        assert await store.add_audit([event, event]) == 1
        conn = await asyncpg.connect(database_url)
        try:
            for sql in ("UPDATE audit SET org = 'x'", "DELETE FROM audit", "TRUNCATE audit"):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(sql)
            assert await conn.fetchval("SELECT COUNT(*) FROM audit") == 1
        finally:
            await conn.close()
    finally:
        await store.close()


async def admin_get(url: str, path: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=30) as http:
        return await http.get(path, params=params)


async def test_reports_come_from_the_ledger_role(tmp_path: Path, postgres: Postgres) -> None:
    url = await postgres.create_database()
    stack = Stack(tmp_path)
    stack.start_nats()
    stack.start_scheduler()
    stack.start_worker()
    try:
        a = await stack.start_api(ledger=False)
        b = await stack.start_api(ledger=False)
        await stack.wait_for_model(ECHO)
        # no ledger yet: the report is a 503 with Retry-After, not a 500
        down = await admin_get(a, "/v1/admin/usage")
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1, down.text
        _, metrics = stack.start_ledger(**LEDGER_ENV, TOKENYARD_DATABASE_URL=url)
        await wait_ready(metrics)
        async with httpx.AsyncClient(base_url=a, headers=auth_headers(), timeout=30) as http:
            for i in range(5):
                body = {"model": ECHO, "messages": [{"role": "user", "content": f"hi {i}"}]}
                assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            created = await http.post("/v1/admin/orgs", json={"name": "acme"})
            assert created.status_code == 201
        deadline = time.monotonic() + 30
        while True:
            report_a = (await admin_get(a, "/v1/admin/usage", group_by="model")).json()["data"]
            if report_a and report_a[0]["requests"] == 5:
                break
            assert time.monotonic() < deadline, report_a
            await asyncio.sleep(0.1)
        assert (await admin_get(b, "/v1/admin/usage", group_by="model")).json()["data"] == report_a
        series = (await admin_get(b, "/v1/admin/usage/series", group_by="model", interval=60)).json()["data"]
        assert sum(row["requests"] for row in series) == 5 and all(row["t"] % 60 == 0 for row in series), series
        assert (await admin_get(a, "/v1/admin/usage/series", group_by="model", interval=60)).json()["data"] == series
        audit_a = (await admin_get(a, "/v1/admin/audit")).json()["data"]
        assert "org.create" in {row["action"] for row in audit_a}
        deadline = time.monotonic() + 10
        while (await admin_get(b, "/v1/admin/audit")).json()["data"] != audit_a:
            assert time.monotonic() < deadline, "the two gateways answer different audit logs"
            await asyncio.sleep(0.1)
        # a big export, page by page over NATS: every row once, in order, as CSV too
        await publish(await stack.bus(), 0, 6000)
        deadline = time.monotonic() + 60
        while len(rows := (await admin_get(b, "/v1/admin/usage/export", format="json")).json()["data"]) < 6005:
            assert time.monotonic() < deadline, len(rows)
            await asyncio.sleep(0.2)
        assert len(rows) == len({r["job_id"] for r in rows}) == 6005
        assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
        csv = (await admin_get(a, "/v1/admin/usage/export", org="org_load")).text
        assert len(csv.strip().splitlines()) == 6001  # a header and one line per job of that org
        by_key = (await admin_get(a, "/v1/admin/usage", group_by="key", org="org_load")).json()["data"]
        assert sum(r["requests"] for r in by_key) == 6000 and len(by_key) == 7
        bad = await admin_get(a, "/v1/admin/usage", group_by="nonsense")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    finally:
        await stack.close()


async def test_ledger_process_alone(tmp_path: Path) -> None:
    """`/healthz` and `/readyz` and the SQLite default, with nothing else running but NATS."""
    stack = await ledger_stack(tmp_path)
    try:
        ledger, metrics = stack.start_ledger(**LEDGER_ENV)
        await wait_ready(metrics)
        async with httpx.AsyncClient(base_url=metrics, timeout=5) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/nothing")).status_code == 404
        assert (tmp_path / "ledger" / "ledger.sqlite").exists()
        assert isinstance(ledger, Proc) and ledger.stop() == 0  # SIGTERM: a clean stop
    finally:
        await stack.close()
