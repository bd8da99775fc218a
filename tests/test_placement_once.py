"""A job is placed at most once per dispatch, whoever is asked and however often.

What the long chaos run showed (bench/RESULTS.md section 9): a gateway whose submission's
answer was late asks again, and the retry reaches the other scheduler, which places the job
again. JetStream's dedupe (the work message's `Nats-Msg-Id`) drops that copy only while it
remembers the id, and a nats-server restarted after the job's message was acked and removed
from the work queue has forgotten it: the copy was stored and a worker ran the job a second
time, after its answer was already given. Each test here runs a real nats-server (fsync on
every write) and real scheduler processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig

from scheduler.placements import STALE, Claim, Placements
from scheduler.publish import publish_job
from schemas import streams, subjects
from schemas.jetstream import open_bucket
from schemas.jobs import Admission, Job, Submission
from schemas.placements import PLACED, PLACING, Placement
from tests.helpers import ECHO, MODEL, FakeNodes, eventually, node, sdk, submit
from tests.stack import Proc, Stack

POOL = "own"


@pytest.fixture
async def placing(tmp_path: Path) -> AsyncIterator[tuple[Stack, NATS]]:
    """NATS and one scheduler over a fake node of MODEL; the test pulls the work queue itself."""
    stack = Stack(tmp_path, sync_always=True)
    stack.start_nats()
    nc = await stack.connect()
    nodes = await FakeNodes(nc, [node("own-1", POOL, slots=8)]).start()
    stack.start_scheduler()
    try:
        await stack.wait_for_scheduler()
        yield stack, nc
    finally:
        await nodes.stop()
        with contextlib.suppress(Exception):
            await nc.close()
        await stack.close()


async def _pull(nc: NATS, wait: float) -> list[Any]:
    """What the work queue of (POOL, MODEL) holds within `wait` seconds, acked (a worker that
    ran it): the same durable consumer the workers use."""
    js = nc.jetstream()
    durable = subjects.work_consumer(POOL, MODEL)
    psub = await js.pull_subscribe(
        subjects.work_subject(POOL, MODEL),
        durable=durable,
        stream=subjects.WORK_STREAM,
        config=ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0),
    )
    got = []
    deadline = time.monotonic() + wait
    with contextlib.suppress(Exception):
        while time.monotonic() < deadline:
            try:
                msgs = await psub.fetch(8, timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                continue
            for m in msgs:
                await m.ack_sync()
                got.append(Job.decode(m.data))
    with contextlib.suppress(Exception):
        await psub.unsubscribe()
    return got


async def _restart_nats(stack: Stack) -> None:
    assert stack.nats is not None
    port = stack.nats.port
    stack.nats.kill()  # SIGKILL: what JetStream remembers is what it stored
    await asyncio.sleep(0.3)
    stack.nats = stack.nats_server(port=port, sync_always=True).start()


async def _submit_until_answered(nc: NATS, sub: Submission, timeout: float = 20.0) -> Admission:
    """The gateway's retry: ask again while the schedulers reconnect or a stream is between leaders."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = await submit(nc, sub, timeout=5.0)
            if answer.error is None or time.monotonic() > deadline:
                return answer
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def test_a_retry_reaching_another_scheduler_after_a_nats_restart_is_not_placed_again(
    placing: tuple[Stack, NATS],
) -> None:
    stack, nc = placing
    sub = Submission(job=_job("once-1"))
    first = await submit(nc, sub)
    assert first.error is None and first.pool == POOL
    ran = await _pull(nc, wait=5.0)
    assert [j.id for j in ran] == ["once-1"]  # placed, run and acked: gone from the work queue

    await _restart_nats(stack)  # JetStream forgets the ids of messages it no longer holds
    first_scheduler = next(p for p in stack.procs if p.name == "scheduler")
    second = stack.start_scheduler(TOKENYARD_LOG_LEVEL="info")  # the first one's memory of its answers is not shared
    first_scheduler.kill()
    assert await eventually(lambda: _started(second), timeout=30.0), "the second scheduler never started"

    again = await _submit_until_answered(nc, sub)  # the gateway's retry, answered by the other scheduler
    assert again.error is None, again.error
    assert again.pool == first.pool  # what the first placement answered: the job is where it was put
    copies = await _pull(nc, wait=3.0)
    assert [j.id for j in copies] == [], "the job was placed a second time at the same dispatch"
    assert "job.placed_already" in second.output()  # answered from the first placement's record

    # a re-dispatch is a new placement (dispatch 2), and is placed
    redispatch = Submission(job=_job("once-1", dispatch=2), failed_pool=POOL, failed_node="own-1")
    assert (await _submit_until_answered(nc, redispatch)).error is None
    assert [(j.id, j.dispatch) for j in await _pull(nc, wait=5.0)] == [("once-1", 2)]


async def test_two_schedulers_asked_at_once_place_a_job_once(placing: tuple[Stack, NATS]) -> None:
    """The same submission sent many times at once while two schedulers answer (the queue group
    spreads them): one message in the work queue per job."""
    stack, nc = placing
    second = stack.start_scheduler(TOKENYARD_LOG_LEVEL="info")
    assert await eventually(lambda: _started(second), timeout=30.0), "the second scheduler never started"
    subs = [Submission(job=_job(f"pair-{i}")) for i in range(6)]
    answers = await asyncio.gather(*(submit(nc, s) for s in subs for _ in range(4)))
    assert all(a.error is None and a.pool == POOL for a in answers), [a.error for a in answers]
    ran = await _pull(nc, wait=5.0)
    assert sorted(j.id for j in ran) == sorted(s.job.id for s in subs)


async def test_claims_on_one_placement_in_a_real_bucket(tmp_path: Path) -> None:
    """`scheduler.placements` over a real nats-server's KV: one claim wins, the other waits for
    its outcome; an abandoned claim may be made again; a stale one (its scheduler died) is
    taken over and the dead one's late record is refused; a scheduler knows its own claim."""
    stack = Stack(tmp_path, auth=False)
    stack.start_nats()
    nc = await stack.connect()
    try:
        kv = await open_bucket(nc, nc.jetstream(), streams.PLACEMENTS, replicas=1)
        now = [1000.0]
        a = Placements(kv, nc, instance="sched-a", clock=lambda: now[0])
        b = Placements(kv, nc, instance="sched-b", clock=lambda: now[0])
        await a.start()  # both run: each answers "alive"
        await b.start()
        mine = Placement(PLACING, now[0], by="a", pool="p1", live_workers=2)
        theirs = Placement(PLACING, now[0], by="b", pool="p2")

        first = await a.claim("j.1", mine)
        assert isinstance(first, Claim)
        waiting = asyncio.create_task(b.claim("j.1", theirs))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # "placing": the other waits
        assert isinstance(await a.claim("j.1", mine), Claim)  # a's own claim (its create's ack was lost)
        await a.placed(first, seq=7)
        found = await asyncio.wait_for(waiting, 5.0)
        assert isinstance(found, Placement) and (found.pool, found.seq, found.state) == ("p1", 7, PLACED)
        assert found.answer() == Admission(pool="p1", live_workers=2)

        abandoned = await a.claim("j.2", mine)
        assert isinstance(abandoned, Claim)
        await a.abandon(abandoned)
        assert isinstance(await b.claim("j.2", theirs), Claim)

        dead = await a.claim("j.3", mine)
        assert isinstance(dead, Claim)
        now[0] += STALE + 1.0
        taken = await b.claim("j.3", dataclasses.replace(theirs, at=now[0]))
        assert isinstance(taken, Claim)
        await a.placed(dead, seq=1)  # too late: b holds it (compare-and-set)
        await b.placed(taken, seq=2)
        again = await a.claim("j.3", dataclasses.replace(mine, at=now[0]))
        assert isinstance(again, Placement) and (again.pool, again.seq) == ("p2", 2)

        # the gateway heard from the job (`started`): a claim still "placing" is its placement
        stuck = await a.claim("j.4", mine)
        assert isinstance(stuck, Claim) and stuck.placement.scheduler == "sched-a"
        known = await asyncio.wait_for(b.claim("j.4", theirs, started=True), 2.0)
        assert isinstance(known, Placement) and (known.state, known.pool) == (PLACING, "p1")

        # a scheduler that died with its claim "placing" (nobody answers its "alive"): taken
        # over at once, not once stale
        c = Placements(kv, nc, instance="sched-c", clock=lambda: now[0])
        await c.start()
        orphaned = await c.claim("j.5", mine)
        assert isinstance(orphaned, Claim)
        await c.stop()
        asked = time.monotonic()
        taken = await asyncio.wait_for(b.claim("j.5", dataclasses.replace(theirs, at=now[0])), 5.0)
        assert isinstance(taken, Claim) and time.monotonic() - asked < 2.0
    finally:
        await nc.close()
        await stack.close()


class DyingScheduler:
    """A scheduler SIGKILLed in the middle of a placement, played by the test with the real
    parts: it takes the first submission in the schedulers' queue group, claims its placement in
    the shared bucket, and either dies at once (`publishes` False: before its publish) or also
    publishes the job to its work queue and is then stuck (a SIGSTOP: its "alive" subject is
    held, never answered). Either way the gateway never gets its answer."""

    def __init__(self, stack: Stack, *, publishes: bool) -> None:
        self._stack = stack
        self._publishes = publishes
        self.instance = "dying-" + ("stuck" if publishes else "dead")
        self.took: asyncio.Future[Submission] = asyncio.get_running_loop().create_future()
        self.nc: NATS | None = None

    async def start(self) -> None:
        self.nc = await self._stack.connect()
        self._submits = await self.nc.subscribe(
            subjects.SCHED_SUBMIT, queue=subjects.SCHEDULER_QUEUE_GROUP, cb=self._on_submit
        )
        if self._publishes:  # alive as NATS sees it, answering nothing
            await self.nc.subscribe(subjects.scheduler_alive(self.instance), cb=self._ignore)

    async def _ignore(self, msg: Any) -> None:
        pass

    async def _on_submit(self, msg: Any) -> None:
        if self.took.done():  # the gateway's retries: a dead scheduler answers none
            return
        assert self.nc is not None
        sub = Submission.decode(msg.data)
        job = sub.job
        js = self.nc.jetstream()
        kv = await open_bucket(self.nc, js, streams.PLACEMENTS, replicas=1)
        placing = Placement(PLACING, time.time(), by="dying", scheduler=self.instance, pool="own", live_workers=1)
        await kv.create(subjects.placement_key(job.id, job.dispatch), placing.encode())
        if self._publishes:
            await publish_job(js, subjects.work_subject("own", job.model), job.encode(), msg_id=job.message_id)
        self.took.set_result(sub)

    async def die(self) -> None:
        """Leave the queue group (its retries go to the real schedulers from now on); without a
        publish, die whole (its connection closes: nobody answers its "alive")."""
        assert self.nc is not None
        await self._submits.unsubscribe()
        if not self._publishes:
            await self.nc.close()

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


@pytest.mark.parametrize("publishes", [False, True], ids=["died-before-its-publish", "stuck-after-its-publish"])
async def test_a_scheduler_dying_mid_placement_costs_its_job_seconds_not_a_refusal(
    tmp_path: Path, publishes: bool
) -> None:
    """The long chaos run's run 9 (bench/RESULTS.md section 9): a scheduler SIGKILLed between
    its publish and its record left the claim "placing"; the gateway's retries reached the other
    scheduler, which waited 20 s for the claim to go stale, so the client got a 503 after 17 s
    while the job ran (and, at 20 s, was placed again). Now a claim whose scheduler is gone is
    taken over at once, and a retry that says the job already spoke is answered from the claim.
    Either way: the answer, whole, within seconds, from one run of the job."""
    stack = Stack(tmp_path, sync_always=True)
    stack.start_nats()
    first = stack.start_scheduler()
    worker = stack.start_worker(TOKENYARD_LOG_LEVEL="info")
    dying = DyingScheduler(stack, publishes=publishes)
    try:
        await stack.start_api(request_timeout=40.0)
        await stack.wait_for_model(ECHO)
        first.kill()  # the queue group is the dying scheduler's alone
        await asyncio.to_thread(first.popen.wait, 10)
        await dying.start()
        async with sdk(stack, timeout=60) as client:
            asked = time.monotonic()
            answer = asyncio.create_task(
                client.chat.completions.create(
                    model=ECHO, messages=[{"role": "user", "content": "placed [[tokens=5]]"}]
                )
            )
            sub = await asyncio.wait_for(dying.took, 10.0)
            second = stack.start_scheduler(TOKENYARD_LOG_LEVEL="info")
            assert await eventually(lambda: _started(second), timeout=30.0), "the second scheduler never started"
            serving = time.monotonic()
            await dying.die()
            done = await asyncio.wait_for(answer, 40.0)
        assert done.choices[0].message.content == "placed placed placed placed placed"
        assert done.id == f"chatcmpl-{sub.job.id}"
        # within a few of the gateway's 2 s retries of the second scheduler starting, not the 20 s stale wait
        assert time.monotonic() - serving < STALE / 2, time.monotonic() - asked
        why = "placement.started_unrecorded" if publishes else "placement.taken_over"
        assert why in second.output(), second.output()[-3000:]
        await asyncio.sleep(2.0)  # a second run of the job would have started by now
        runs = re.findall(rf"job\.done .*job_id={sub.job.id}", worker.output())
        assert len(runs) == 1, worker.output()[-3000:]
    finally:
        await dying.close()
        await stack.close()


async def _started(proc: Proc) -> bool:
    return "scheduler.started" in proc.output()


def _job(job_id: str, *, dispatch: int = 1) -> Job:
    return Job(
        id=job_id,
        model=MODEL,
        request={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        reply=subjects.reply_subject("test", job_id),
        deadline=time.time() + 120.0,
        dispatch=dispatch,
    )
