"""More faults: a worker killed mid-stream, a zombie worker, a gateway killed mid-stream, a
full queue, and a submission retried after a lost answer."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import openai
import pytest

from schemas import subjects
from schemas.jobs import Admission, Job, ModelAdvert, NodeAdvert, Submission
from tests.helpers import ECHO, Sse, sdk, watch_adverts
from tests.stack import Stack


async def test_worker_killed_mid_stream_ends_the_stream_with_an_error(stack: Stack) -> None:
    worker = stack.start_worker()
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    async with sdk(stack) as client:
        stream = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "tick [[tokens=500]] [[rate=50]]"}], stream=True
        )
        sse = await Sse().drain(stream, until=lambda s: len(s.text) > 20, timeout=30)
        worker.signal(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(openai.APIError) as e:
            await sse.drain(stream, timeout=30)
        waited = time.monotonic() - started
        received = sse.text
    assert "interrupted" in str(e.value.message)
    assert 0.5 < waited < 5  # a few missed heartbeats, never a hang
    assert received and ("tick " * 500).startswith(received.strip() + " ") or received.strip() == "tick"


async def test_zombie_worker_late_tokens_are_dropped(stack: Stack) -> None:
    workers = [stack.start_worker(TOKENYARD_NODE_ID=f"w{i}", TOKENYARD_SLOTS="4") for i in range(2)]
    await stack.start_api()
    await stack.wait_for_model(ECHO, nodes=2)
    adverts = await watch_adverts(stack)
    async with sdk(stack) as client:
        request = asyncio.create_task(
            client.chat.completions.create(
                model=ECHO,
                messages=[{"role": "user", "content": "one two three [[tokens=9]] [[delay=1.0]]"}],
                stream=True,
            )
        )
        assert await adverts.wait(lambda a: any(n.slots_free < 4 for n in a.values()), 2.0)
        busy = next(n for n, a in adverts.latest.items() if a.slots_free < 4)
        zombie = workers[int(busy[1:])]
        zombie.signal(signal.SIGSTOP)  # frozen past ack_wait: JetStream redelivers to the other worker
        stream = await asyncio.wait_for(request, 15)
        sse = await Sse().drain(stream, timeout=15)
        zombie.signal(signal.SIGCONT)  # it wakes up and sends its late tokens: they must go nowhere
        await asyncio.sleep(1.5)
        r = await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "still fine"}])
    assert sse.text == "one two three one two three one two three"
    assert sse.finish == "stop"
    assert r.choices[0].message.content.startswith("still fine")
    assert zombie.alive()


async def test_gateway_killed_mid_stream_stops_the_worker(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="3")
    api, url = await stack.spawn_api()
    await stack.start_api()  # the test's own view; the stream goes through the spawned one
    await stack.wait_for_model(ECHO)
    adverts = await watch_adverts(stack)
    async with sdk(stack, url=url) as client:
        stream = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "long [[tokens=3000]] [[rate=50]]"}], stream=True
        )
        await stream.__anext__()
        assert await adverts.wait(lambda a: any(n.slots_free == 2 for n in a.values()), 2.0)
        api.kill()
        killed = time.monotonic()
        assert await adverts.wait(lambda a: a and all(n.slots_free == 3 for n in a.values()), 5.0)
        assert time.monotonic() - killed < 3.0


async def test_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.start_nats()
    stack.start_scheduler(TOKENYARD_QUEUE_MAX_JOBS="2")  # running jobs count until acked
    stack.start_worker(TOKENYARD_SLOTS="1")
    try:
        await stack.start_api()
        await stack.wait_for_model(ECHO)
        async with sdk(stack) as client:
            busy = await client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "busy [[tokens=400]] [[rate=40]]"}], stream=True
            )
            await busy.__anext__()  # the only slot is taken
            queued = asyncio.create_task(
                client.chat.completions.create(
                    model=ECHO, messages=[{"role": "user", "content": "queued"}], max_tokens=1
                )
            )
            await asyncio.sleep(0.5)  # now the one queue place is taken too
            with pytest.raises(openai.RateLimitError) as e:
                await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "too many"}])
            assert e.value.body["code"] == "queue_full"
            assert int(e.value.response.headers["retry-after"]) >= 1
            await busy.close()  # the queued one is served once the slot frees
            r = await asyncio.wait_for(queued, 10)
            assert r.choices[0].message.content == "queued"
    finally:
        await stack.close()


async def test_submission_retried_after_a_lost_answer_runs_once(stack: Stack) -> None:
    """A gateway that never got the scheduler's answer asks again with the same job: JetStream
    keeps one copy (the job id is the message id)."""
    await stack.wait_for_scheduler()
    nc = await stack.bus()
    advert = NodeAdvert(
        node="test-node",
        pool="own",
        models=(ModelAdvert("wire/model", 100),),
        slots_total=1,
        slots_free=1,
        interval=5.0,
    )
    await nc.publish(subjects.fleet_heartbeat("test-node"), advert.encode())  # a node that never pulls
    await nc.flush()
    await asyncio.sleep(0.3)
    job = Job(
        id="job-twice",
        model="wire/model",
        request={"model": "wire/model", "messages": []},
        reply="ty.reply.none.job-twice",
        deadline=time.time() + 60,
    )
    data = Submission(job=job).encode()
    answers = [Admission.decode((await nc.request(subjects.SCHED_SUBMIT, data, timeout=5)).data) for _ in range(3)]
    assert all(a.error is None and a.pool == "own" for a in answers)
    info = await nc.jetstream().stream_info(subjects.WORK_STREAM)
    assert info.state.messages == 1


async def test_a_job_that_fails_every_attempt_gets_a_clear_error(stack: Stack) -> None:
    stack.start_worker()
    await stack.start_api(max_dispatches=3)
    await stack.wait_for_model(ECHO)
    async with sdk(stack) as client:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "[[fail]]"}])
        assert e.value.status_code == 502
        assert "every attempt (3)" in e.value.message
        assert time.monotonic() - started < 5
        r = await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "next"}])
        assert r.choices[0].message.content.startswith("next")  # other jobs keep flowing
