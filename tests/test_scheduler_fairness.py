"""Priority tiers and fair share: the pure queue, then held jobs released fairly by a real
scheduler over a real nats-server, and held jobs surviving a scheduler killed -9."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig

from scheduler.fairness import FairQueue, Item
from schemas import subjects
from schemas.errors import from_wire
from schemas.jobs import Job, Submission
from tests.helpers import MODEL, FakeNodes, job, node, submit
from tests.stack import Stack


def fill(q: FairQueue[str], tenant: str, tier: str, n: int, since: float = 0.0) -> None:
    for i in range(n):
        q.push(Item(f"{tenant}-{i}", tenant, tier, since))


def drain(q: FairQueue[str], n: int, now: float = 1.0) -> list[Item[str]]:
    out = []
    for _ in range(n):
        item = q.pop(now)
        if item is None:
            break
        out.append(item)
    return out


# --- pure -----------------------------------------------------------------------------------


def test_tenants_in_a_tier_take_turns_whatever_their_backlog() -> None:
    q: FairQueue[str] = FairQueue()
    fill(q, "flood", "standard", 1000)
    fill(q, "small", "standard", 3)
    first = [i.tenant for i in drain(q, 6)]
    assert first == ["flood", "small", "flood", "small", "flood", "small"]
    assert len(q) == 997


def test_tiers_share_by_weight_and_batch_never_starves() -> None:
    q: FairQueue[str] = FairQueue()
    fill(q, "i", "interactive", 1000)
    fill(q, "s", "standard", 1000)
    fill(q, "b", "batch", 1000)
    counts = Counter(i.tier for i in drain(q, 120))
    assert counts == {"interactive": 80, "standard": 30, "batch": 10}


def test_an_idle_tier_earns_no_burst() -> None:
    q: FairQueue[str] = FairQueue()
    fill(q, "b", "batch", 100)
    drain(q, 50)  # batch alone for a while
    fill(q, "i", "interactive", 100)
    counts = Counter(i.tier for i in drain(q, 18))
    assert counts["interactive"] >= 15  # not starved by the credit batch did not use


def test_aging_serves_the_oldest_past_the_limit() -> None:
    q: FairQueue[str] = FairQueue(aging=30.0)
    fill(q, "b", "batch", 1, since=0.0)
    fill(q, "i", "interactive", 100, since=25.0)
    q.pop(1.0)  # interactive's turn
    assert q.pop(31.0).tier == "batch"  # type: ignore[union-attr]


def test_unknown_tiers_are_standard_and_an_empty_queue_pops_none() -> None:
    q: FairQueue[str] = FairQueue()
    assert q.pop(0.0) is None
    fill(q, "x", "platinum", 1)
    assert q.waiting()["standard"] == 1


# --- real nats-server: held jobs are released fairly ------------------------------------------


class Puller:
    """A worker stand-in: pulls jobs from one work queue when told, and acks them."""

    def __init__(self, nc: NATS, pool: str = "own", model: str = MODEL) -> None:
        self.js = nc.jetstream()
        self.pool, self.model = pool, model
        self.psub: Any = None

    async def start(self) -> Puller:
        config = ConsumerConfig(
            durable_name=subjects.work_consumer(self.pool, self.model),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            filter_subject=subjects.work_subject(self.pool, self.model),
        )
        for _ in range(100):
            try:
                self.psub = await self.js.pull_subscribe(
                    config.filter_subject or "", durable=config.durable_name, stream=subjects.WORK_STREAM, config=config
                )
                return self
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
        raise TimeoutError("no work stream")

    async def take(self, n: int, timeout: float = 5.0) -> list[Job]:
        jobs: list[Job] = []
        deadline = time.monotonic() + timeout
        while len(jobs) < n and time.monotonic() < deadline:
            try:
                msgs = await self.psub.fetch(min(n - len(jobs), 64), timeout=0.5)
            except TimeoutError:  # nats' own, or asyncio's from fetch
                continue
            for m in msgs:
                jobs.append(Job.decode(m.data))
                await m.ack()
        return jobs


@pytest.fixture
async def held(tmp_path: Path) -> AsyncIterator[tuple[Stack, NATS]]:
    stack = Stack(tmp_path)
    stack.start_nats()
    nc = await stack.connect()
    nodes = await FakeNodes(nc, [node("n1", slots=4, free=0)]).start()
    stack.start_scheduler(TOKENYARD_MIN_BUFFER="2", TOKENYARD_INTAKE_ACK_WAIT="2", TOKENYARD_INTAKE_MAX_PER_TENANT="50")
    try:
        await stack.wait_for_scheduler()
        yield stack, nc
    finally:
        await nodes.stop()
        await nc.close()
        await stack.close()


async def _until_held(nc: NATS, n: int, timeout: float = 20.0) -> None:
    """Until the schedulers hold `n` jobs from the intake (fetched into their fair queues): on a
    loaded machine the intake is read a moment after admission, and a release made before the
    last jobs were read could only be fair to the ones it knew."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(subjects.INTAKE_STREAM, subjects.RELEASE_CONSUMER)
        if info.num_ack_pending >= n and not info.num_pending:
            return
        assert time.monotonic() < deadline, f"held {info.num_ack_pending} of {n}"
        await asyncio.sleep(0.05)


async def _submit_all(nc: NATS, subs: list[Submission]) -> list[Any]:
    return list(await asyncio.gather(*(submit(nc, s) for s in subs)))


async def test_a_flood_from_one_tenant_does_not_stall_another(held: Any) -> None:
    stack, nc = held
    flood = [Submission(job=job(f"flood-{i}"), tenant="flood") for i in range(40)]
    assert all(a.error is None for a in await _submit_all(nc, flood))
    late = [Submission(job=job(f"late-{i}"), tenant="late") for i in range(4)]
    assert all(a.error is None for a in await _submit_all(nc, late))
    await _until_held(nc, 42)  # the scheduler knows every held job before room appears
    puller = await Puller(nc).start()
    taken = await puller.take(12)
    tenants = [j.id.split("-")[0] for j in taken]
    # the buffer (2) went out before "late" arrived; after it the tenants alternate
    assert tenants[:2] == ["flood", "flood"]
    assert tenants[2:10].count("late") == 4
    rest = await puller.take(32)
    assert len(taken) + len(rest) == 44  # nothing lost, nothing twice
    assert len({j.id for j in taken + rest}) == 44


async def test_interactive_goes_first_and_batch_still_progresses(held: Any) -> None:
    _, nc = held
    subs = [Submission(job=job(f"batch-{i}"), tenant="b", priority="batch") for i in range(20)] + [
        Submission(job=job(f"inter-{i}"), tenant="i", priority="interactive") for i in range(40)
    ]
    assert all(a.error is None for a in await _submit_all(nc, subs))
    puller = await Puller(nc).start()
    taken = await puller.take(38)
    kinds = Counter(j.id.split("-")[0] for j in taken[2:])  # after the buffer that went out first
    assert kinds["inter"] > 2 * kinds["batch"] and kinds["batch"] >= 2


async def test_a_full_tenant_queue_is_429_for_that_tenant_only(held: Any) -> None:
    _, nc = held
    flood = [Submission(job=job(f"full-{i}"), tenant="greedy") for i in range(60)]
    answers = await _submit_all(nc, flood)
    refused = [from_wire(a.error) for a in answers if a.error is not None]
    assert refused and all(e.status == 429 and e.code == "queue_full" and e.retry_after for e in refused)
    other = await submit(nc, Submission(job=job("polite-0"), tenant="polite"))
    assert other.error is None


async def test_held_jobs_survive_a_scheduler_killed_9(held: Any) -> None:
    stack, nc = held
    subs = [Submission(job=job(f"kill-{i}"), tenant=f"t{i % 3}") for i in range(20)]
    assert all(a.error is None for a in await _submit_all(nc, subs))
    stack.procs[0].kill()  # holding 18 of them, un-acked
    stack.start_scheduler(TOKENYARD_MIN_BUFFER="2", TOKENYARD_INTAKE_ACK_WAIT="2")
    puller = await Puller(nc).start()
    jobs = await puller.take(20, timeout=15.0)
    assert sorted(j.id for j in jobs) == sorted(s.job.id for s in subs)
    assert not await puller.take(1, timeout=1.0)  # and none twice
