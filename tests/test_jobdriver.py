"""The job driver on a lagging gateway: an event read late is not taken for the attempt's
silence, and nothing the driver gave up on reaches the client after it decided.

A loaded gateway's event loop can run a wait's timeout and the reading of the event that ends
it in one turn, then resume the driver more than the silence bound later (the long chaos run at
load ~13: three jobs declared silent in one millisecond, one continued from 5 words while a 6th
already waited in its queue, and the client got that word twice). The lag is made here by
blocking the loop, as a busy gateway does, around a real NATS connection."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from broker_api.attempts import JobDriver, Policy
from broker_api.bus import Bus
from broker_api.jobrun import JobRun
from broker_api.lag import LoopLag
from broker_api.output import Output
from schemas.errors import TokenyardError
from schemas.events import Delta, Done, Piece, Start
from schemas.jobs import Job, Submission
from schemas.settings import NatsSettings
from tests.stack import Stack

SILENCE = 1.0


def delta(seq: int, text: str) -> Delta:
    return Delta("j", 1001, seq, "a", pieces=(Piece(0, text, 1),))


async def test_an_event_read_late_by_a_lagging_loop_is_not_silence(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.start_nats()
    bus = await Bus.connect(NatsSettings(url=stack.nats_url, creds=stack.creds("api")))
    lag = LoopLag()  # as the gateway's lifespan runs it
    watching = asyncio.create_task(lag.run())
    try:
        job = Job(id="j", model="m", request={}, reply="r", deadline=time.time() + 30)
        run = JobRun(job, silence=SILENCE)
        output = Output(choices=1)

        def continued(request: dict[str, Any], text: str, tokens: int) -> dict[str, Any]:
            return {**request, "prefix": text}

        driver = JobDriver(
            bus,
            run,
            Submission(job=job),
            output,
            policy=Policy(max_dispatches=3, continues=True),
            continuation=continued,
            submit_timeout=1.0,
            lag=lag,
        )
        got: list[Delta | Done] = []

        async def client() -> None:
            async for ev in driver.events():
                run.commit()
                got.append(ev)

        reading = asyncio.create_task(client())
        loop = asyncio.get_running_loop()
        assert run.offer(Start("j", 1001, 0, "a"), time.monotonic())
        assert run.offer(delta(1, "a "), time.monotonic())
        await asyncio.sleep(0.1)  # read: the driver now waits until the silence could run out
        assert [e.pieces[0].text for e in got] == ["a "]

        def late() -> None:  # the loop turn that reads the next event, long after it was sent
            assert run.offer(delta(2, "b "), time.monotonic())
            time.sleep(SILENCE + 0.3)  # ... and then runs everything else that waited

        def busy() -> None:  # the turn before: the wait's timeout runs out meanwhile
            time.sleep(0.2)
            loop.call_soon(late)

        loop.call_at(run.heard + SILENCE - 0.05, busy)
        await asyncio.sleep(SILENCE + 1.0)
        assert run.offer(delta(3, "c "), time.monotonic())
        done = Done("j", 1001, 4, "a", finish=("stop",), prompt_tokens=1, completion_tokens=3)
        assert run.offer(done, time.monotonic())
        await asyncio.wait_for(reading, 10)
        assert [e.pieces[0].text for e in got if isinstance(e, Delta)] == ["a ", "b ", "c "]
        assert isinstance(got[-1], Done) and run.job.dispatch == 1  # never placed again
        assert output.text(0) == "a b c " and output.tokens == 3
    finally:
        watching.cancel()
        await bus.close()
        await stack.close()


async def test_a_stopped_attempts_count_is_never_the_answer(tmp_path: Path) -> None:
    """The long chaos run's run 10 (cluster): an attempt stopped by something other than the
    driver sent its count, a DONE whose finish is "cancelled", while it was the current one; the
    driver took it for the answer and shaping finish "cancelled" was an HTTP 500. Now it is the
    attempt ended early: the job is placed again (here no scheduler runs: a clear refusal)."""
    stack = Stack(tmp_path)
    stack.start_nats()
    bus = await Bus.connect(NatsSettings(url=stack.nats_url, creds=stack.creds("api")))
    try:
        job = Job(id="j", model="m", request={}, reply="r", deadline=time.time() + 30)
        run = JobRun(job, silence=SILENCE)
        driver = JobDriver(
            bus,
            run,
            Submission(job=job),
            Output(choices=1),
            policy=Policy(max_dispatches=3, continues=False),
            continuation=None,
            submit_timeout=1.0,
            lag=LoopLag(),
        )
        got: list[Delta | Done] = []

        async def client() -> None:
            async for ev in driver.events():
                got.append(ev)

        reading = asyncio.create_task(client())
        assert run.offer(Start("j", 1001, 0, "a"), time.monotonic())
        assert run.offer(delta(1, "a "), time.monotonic())
        stopped = Done("j", 1001, 2, "a", finish=("cancelled",), prompt_tokens=1, completion_tokens=1)
        assert run.offer(stopped, time.monotonic())
        with pytest.raises(TokenyardError) as refused:
            await asyncio.wait_for(reading, 10)
        assert not any(isinstance(e, Done) for e in got)
        assert run.job.dispatch == 2 and refused.value.status == 503  # placed again: no scheduler
    finally:
        await bus.close()
        await stack.close()
