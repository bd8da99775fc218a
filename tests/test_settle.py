"""Settlement (`scheduler.settle`) on a real nats-server: a usage record replaces its job's
reservation by what the job used, once, however often it is delivered; records for keys that
hold nothing write nothing; an unreadable record is dropped without stopping the loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from broker_api.embedded_nats import NatsServer
from scheduler import limits as L
from scheduler.quota import Quota
from scheduler.settle import Settler, settle_record
from schemas import streams, subjects
from schemas.jetstream import ensure, open_bucket
from schemas.tenancy import Limits
from schemas.usage import UsageRecord
from tests.helpers import eventually, publish_usage

LIMITED = Limits(tokens_per_day=10_000, usd_per_day=5.0)
ENTRY = subjects.limits_entry("k", "k1")


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[NATS]:
    server = NatsServer(tmp_path / "nats").start()
    conn = await nats.connect(server.url)
    try:
        yield conn
    finally:
        await conn.close()
        server.stop()


async def reserve(quota: Quota, job_id: str, tokens: int, usd: float = 0.0) -> None:
    now = time.time()
    ask = L.Ask(job_id, tokens, now + 600, completion_tokens=0, input_price=usd / tokens)  # reserves tokens, usd
    await quota.change(ENTRY, lambda c: L.reserve(c, LIMITED, ask, now))


async def test_records_settle_their_reservations_once_and_bad_ones_are_dropped(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure(nc, streams.USAGE, replicas=None)
    kv = await open_bucket(nc, js, streams.LIMITS, replicas=None)
    quota = Quota(kv, js)
    await quota.start()
    await reserve(quota, "j1", 500, usd=0.5)
    await reserve(quota, "j2", 300)
    seen: list[UsageRecord] = []
    settler = Settler(js, quota, on_record=seen.append, clock=time.time)
    task = asyncio.create_task(settler.run())

    async def consumer_ready() -> bool:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.consumer_info(subjects.USAGE_STREAM, subjects.SETTLE_CONSUMER)
            return True
        return False

    try:
        assert await eventually(consumer_ready)  # it reads new records only
        await publish_usage(nc, "j1", key="k1", tokens=(10, 20), reserved=500, cost=0.01)
        await js.publish(subjects.usage_subject("junk"), b"\xc1 not a record", headers={"Nats-Msg-Id": "junk"})
        await publish_usage(nc, "j1", key="k1", tokens=(10, 20), reserved=500)  # a retried publish: dropped
        await publish_usage(nc, "free", key="k-unlimited", tokens=(1, 1))  # holds nothing anywhere
        await publish_usage(nc, "j2", key="k1", tokens=(40, 60), reserved=300)

        async def all_settled() -> bool:
            return settler.settled == 3

        assert await eventually(all_settled)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await quota.stop()
    assert [r.job_id for r in seen] == ["j1", "free", "j2"]
    counters = L.Counters.decode((await kv.get(ENTRY)).value or b"")
    assert counters.held == {}  # both reservations replaced by what was used
    assert counters.tokens_day == 30 + 100 and counters.usd_day == pytest.approx(0.01)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(subjects.limits_entry("k", "k-unlimited"))
    info = await js.consumer_info(subjects.USAGE_STREAM, subjects.SETTLE_CONSUMER)
    assert info.num_ack_pending == 0 and info.num_pending == 0  # every record acked (or terminated)


async def test_a_redelivered_record_changes_nothing(nc: NATS) -> None:
    js = nc.jetstream()
    kv = await open_bucket(nc, js, streams.LIMITS, replicas=None)
    quota = Quota(kv, js)
    await reserve(quota, "j1", 500)
    record = UsageRecord(
        "j1", time.time(), "", "", "k1", "m", "own", "n", 1, 10, 20, 0, 0.0, 0.0, 0.0, "ok", reserved_tokens=500
    )
    await settle_record(quota, record, time.time())
    once = L.Counters.decode((await kv.get(ENTRY)).value or b"")
    await settle_record(quota, record, time.time())
    assert L.Counters.decode((await kv.get(ENTRY)).value or b"") == once
    assert once.tokens_day == 30 and not once.held
