"""A worker's heartbeats: one beat per gateway for all the attempts it runs for it (`worker.beats`),
and the per-job heartbeat requests a job from a gateway before beats still gets; a gateway that
answers them late (its loop behind) keeps its jobs.

The test plays the gateway: it puts jobs on the work queue itself and reads what a real echo
worker sends to its inbox."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from schemas import subjects
from schemas.beats import Beat, BeatAnswer
from schemas.events import Done, Event, Heartbeat, decode_event
from schemas.jobs import CONTINUE, Job
from tests.helpers import ECHO, wait_until, watch_adverts
from tests.stack import Stack

GATEWAY = "gwbeats"
LONG = "beat [[tokens=400]] [[rate=20]]"  # 20 s of output: it runs until the test stops it
HEARTBEAT = 0.2  # the test workers' (tests/stack.py)


class Inbox:
    """What reaches the fake gateway: beats (answered by `answer`) and events (heartbeat
    requests answered "go on")."""

    def __init__(self) -> None:
        self.beats: list[Beat] = []
        self.events: list[tuple[str, Event]] = []  # (reply token, event)
        self.answer = BeatAnswer()
        self.delay = 0.0  # seconds each answer comes late, as from a gateway whose loop is behind
        self._late: set[asyncio.Task[None]] = set()

    async def on_message(self, msg: Any) -> None:
        token = subjects.reply_token(msg.subject)
        if token == subjects.BEAT_TOKEN:
            beat = Beat.decode(msg.data)
            self.beats.append(beat)
            answer, self.answer = self.answer, BeatAnswer()
            await self._respond(msg, answer.encode())
            return
        ev = decode_event(msg.data)
        self.events.append((token, ev))
        if msg.reply:
            await self._respond(msg, CONTINUE)

    async def _respond(self, msg: Any, data: bytes) -> None:
        if not self.delay:
            await msg.respond(data)
            return

        async def late() -> None:
            await asyncio.sleep(self.delay)
            await msg.respond(data)

        task = asyncio.create_task(late())
        self._late.add(task)
        task.add_done_callback(self._late.discard)


async def put_jobs(stack: Stack, n: int, *, beats: bool, content: str = LONG) -> list[Job]:
    nc = await stack.bus()
    js = nc.jetstream()
    jobs = []
    for _ in range(n):
        job_id = uuid.uuid4().hex
        reply = subjects.reply_subject(GATEWAY, subjects.new_reply_token())
        request = {"model": ECHO, "messages": [{"role": "user", "content": content}]}
        job = Job(id=job_id, model=ECHO, request=request, reply=reply, deadline=time.time() + 60, beats=beats)
        await js.publish(subjects.work_subject("own", ECHO), job.encode(), headers={"Nats-Msg-Id": job.message_id})
        jobs.append(job)
    return jobs


async def started_worker(stack: Stack) -> Inbox:
    await stack.wait_for_scheduler()  # it makes the work stream
    stack.start_worker(TOKENYARD_SLOTS="8")
    adverts = await watch_adverts(stack)
    assert await adverts.wait(lambda a: any(n.slots_total == 8 for n in a.values()), 30)
    inbox = Inbox()
    await (await stack.bus()).subscribe(subjects.reply_inbox(GATEWAY), cb=inbox.on_message)
    return inbox


async def test_one_beat_names_every_attempt_and_stops_the_one_the_gateway_refuses(stack: Stack) -> None:
    inbox = await started_worker(stack)
    jobs = await put_jobs(stack, 3, beats=True)
    tokens = {subjects.reply_token(j.reply) for j in jobs}
    assert await wait_until(lambda: any({b.token for b in beat.attempts} == tokens for beat in inbox.beats), 10)
    # one beat per round for all three attempts, never a heartbeat request per job
    assert not [ev for _, ev in inbox.events if isinstance(ev, Heartbeat)]
    rounds = len(inbox.beats)
    await asyncio.sleep(1.0)  # heartbeat 0.2 s: about five rounds
    assert 2 <= len(inbox.beats) - rounds <= 8
    beat = inbox.beats[-1]
    victim = beat.attempts[0]
    seen = {ev.seq for t, ev in inbox.events if t == victim.token}
    assert victim.seq > 0 and seen >= set(range(victim.seq))  # the number its next event will carry
    inbox.answer = BeatAnswer(stop=(0,))
    assert await wait_until(
        lambda: any(t == victim.token and isinstance(ev, Done) and ev.cancelled for t, ev in inbox.events), 5
    )
    await asyncio.sleep(0.6)
    last = inbox.beats[-1]
    assert {b.token for b in last.attempts} == tokens - {victim.token}  # the others go on


async def test_a_job_from_a_gateway_before_beats_gets_its_own_heartbeats(stack: Stack) -> None:
    inbox = await started_worker(stack)
    (job,) = await put_jobs(stack, 1, beats=False)
    token = subjects.reply_token(job.reply)
    assert await wait_until(lambda: sum(isinstance(ev, Heartbeat) for t, ev in inbox.events if t == token) >= 3, 10)
    assert not [b for beat in inbox.beats for b in beat.attempts if b.token == token]


@pytest.mark.parametrize("beats", [True, False], ids=["beats", "per-job heartbeats"])
async def test_a_gateway_that_answers_late_keeps_its_jobs(stack: Stack, beats: bool) -> None:
    """Every answer comes twice the heartbeat late (a gateway whose loop is behind): no answer
    comes within one interval, yet each comes, and the job runs to its end. Before, three
    heartbeats unanswered within one interval each stopped it."""
    inbox = await started_worker(stack)
    inbox.delay = 2 * HEARTBEAT
    (job,) = await put_jobs(stack, 1, beats=beats, content="late [[tokens=60]] [[rate=20]]")  # 3 s of output
    token = subjects.reply_token(job.reply)
    assert await wait_until(lambda: any(t == token and isinstance(ev, Done) for t, ev in inbox.events), 20)
    (done,) = [ev for t, ev in inbox.events if t == token and isinstance(ev, Done)]
    assert not done.cancelled and done.completion_tokens == 60
    if beats:
        assert sum(any(b.token == token for b in beat.attempts) for beat in inbox.beats) >= 5
    else:
        assert sum(isinstance(ev, Heartbeat) for t, ev in inbox.events if t == token) >= 5
