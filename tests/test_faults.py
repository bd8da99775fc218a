"""Faults with real processes: no worker, a full worker, a client that leaves, a worker killed
before its first token. Every accepted request ends, within its deadline, in one outcome."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from tests.helpers import ECHO, Sse, sdk, watch_adverts
from tests.stack import Stack, auth_headers


async def test_model_without_workers_is_503_at_once(stack: Stack) -> None:
    worker = stack.start_worker()
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    assert worker.stop() == 0  # drains and exits cleanly on SIGTERM
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers()) as http:
        started = time.monotonic()
        r = await http.post(
            "/v1/chat/completions", json={"model": ECHO, "messages": [{"role": "user", "content": "x"}]}
        )
        assert time.monotonic() - started < 1.0
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "no_capacity"
    assert int(r.headers["retry-after"]) >= 1


async def test_no_free_worker_before_the_deadline_is_504(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="1")
    await stack.start_api()
    impatient = await stack.start_api(request_timeout=2.0)
    await stack.wait_for_model(ECHO)
    async with sdk(stack) as client, sdk(stack, url=impatient) as client2:
        busy = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "slow [[tokens=400]] [[rate=40]]"}], stream=True
        )
        first = await busy.__anext__()
        assert first.choices[0].delta.content
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            await client2.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "queued"}])
        waited = time.monotonic() - started
        await busy.close()
    assert e.value.status_code == 504
    assert e.value.body["code"] == "timeout"
    assert 1.5 < waited < 4.0


async def test_client_disconnect_stops_the_job_on_the_worker(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="2")
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    adverts = await watch_adverts(stack)
    async with sdk(stack) as client:
        stream = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "long [[tokens=2000]] [[rate=50]]"}], stream=True
        )
        await stream.__anext__()
        assert await adverts.wait(lambda a: any(n.slots_free == 1 for n in a.values()), 2.0)
        await stream.close()  # the client goes away mid-stream
        # The job would run for 40 s; its slot must be free again within a heartbeat or two.
        assert await adverts.wait(lambda a: all(n.slots_free == 2 for n in a.values()) and a, 2.0)


async def test_client_disconnect_while_waiting_for_a_plain_answer(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="2")
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    adverts = await watch_adverts(stack)
    async with sdk(stack, timeout=1.0) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "long [[tokens=2000]] [[rate=50]]"}]
            )
    assert await adverts.wait(lambda a: a and all(n.slots_free == 2 for n in a.values()), 3.0)


@pytest.mark.parametrize("stream", [False, True])
async def test_worker_killed_before_first_token_runs_elsewhere(stack: Stack, stream: bool) -> None:
    workers = [stack.start_worker(TOKENYARD_NODE_ID=f"w{i}", TOKENYARD_SLOTS="4") for i in range(2)]
    await stack.start_api()
    await stack.wait_for_model(ECHO, nodes=2)
    adverts = await watch_adverts(stack)
    prompt = "alpha beta gamma [[tokens=6]] [[delay=1.5]]"
    async with sdk(stack) as client:
        request = asyncio.create_task(
            client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": prompt}], stream=stream)
        )
        assert await adverts.wait(lambda a: any(n.slots_free < 4 for n in a.values()), 2.0)
        busy = next(n for n, a in adverts.latest.items() if a.slots_free < 4)
        victim = workers[int(busy[1:])]
        victim.signal(signal.SIGKILL)  # pulled and started, no token yet
        started = time.monotonic()
        result = await asyncio.wait_for(request, 15)
        if stream:
            sse = await Sse().drain(result, timeout=15)
            text, finish = sse.text, sse.finish
        else:
            text, finish = result.choices[0].message.content, result.choices[0].finish_reason
    assert text == "alpha beta gamma alpha beta gamma"
    assert finish == "stop"
    assert time.monotonic() - started < 8
    assert not victim.alive()
