"""A gateway that runs behind is not a dead worker, and a dead worker is still found out.

The long chaos run at load ~13 (bench/RESULTS.md, sections 8 and 9): a gateway whose loop ran
seconds behind declared live attempts silent while their beats and events waited unread in its
own inbox, and its workers, their beats answered late, took it for gone. Here the gateway is the
test's own (uvicorn in the test's event loop), so blocking the test's loop is the gateway's loop
falling behind, with real worker processes and a real nats-server around it. A worker that
really stops (SIGSTOP) is still given up on, within the bound (`jobrun.SILENCE_BOUND` times the
silence), the gateway lagging or not.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.helpers import ECHO, sdk, wait_rows, watch_adverts
from tests.stack import Proc, Stack, auth_headers

SILENCE = 1.0  # the test gateway's attempt silence (tests/stack.py)
WORDS = "alpha beta gamma delta epsilon".split()


def answer_of(tokens: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


async def streamed(stack: Stack, prompt: str, *, on_chunk: object = None) -> tuple[list[tuple[float, str]], str]:
    """The stream's text pieces with the time each came, and its finish reason."""
    pieces: list[tuple[float, str]] = []
    finish = ""
    async with sdk(stack) as client:
        stream = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for chunk in stream:
            for c in chunk.choices:
                if c.delta.content:
                    pieces.append((time.monotonic(), c.delta.content))
                finish = c.finish_reason or finish
            if callable(on_chunk):
                await on_chunk(len(pieces))
    return pieces, finish


async def row(stack: Stack) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers()) as http:
        (only,) = await wait_rows(http, 1)
    return only


async def test_a_gateway_whose_loop_is_blocked_mid_stream_keeps_its_attempt(stack: Stack) -> None:
    """The loop blocked for 2.5 times the silence while the worker streams: the worker's events
    and beats wait in the gateway's socket and inbox. The attempt is not taken for silent (no
    second attempt, no continuation), the worker does not take the gateway for gone, and the
    client gets the answer whole, once."""
    for i in range(2):
        stack.start_worker(TOKENYARD_NODE_ID=f"w{i}")
    await stack.start_api()
    await stack.wait_for_model(ECHO, nodes=2)
    blocked = False

    async def block(n: int) -> None:
        nonlocal blocked
        if n >= 5 and not blocked:
            blocked = True
            time.sleep(2.5 * SILENCE)  # the gateway's loop (and this client's) runs nothing meanwhile

    pieces, finish = await streamed(stack, " ".join(WORDS) + " [[tokens=40]] [[rate=20]]", on_chunk=block)
    assert blocked
    assert "".join(p for _, p in pieces) == answer_of(40)  # nothing missing, nothing twice
    assert finish == "stop"
    usage = await row(stack)
    assert usage["attempts"] == 1 and usage["outcome"] == "ok" and usage["completion_tokens"] == 40
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        metrics = (await http.get("/metrics")).text
    (behind,) = [line for line in metrics.splitlines() if line.startswith("tokenyard_api_loop_behind_seconds_total")]
    assert float(behind.split()[-1]) >= 2.0  # what operators see of it


async def swamped() -> None:
    """The loop behind all the time, as on a gateway that never catches up: 0.3 s of every 0.35."""
    while True:
        time.sleep(0.3)
        await asyncio.sleep(0.05)


async def stopped_mid_stream(stack: Stack, *, gateway_blocked: float, swamp: bool = False) -> tuple[float, str]:
    """A stream whose worker is SIGSTOPped after a few words (the gateway's loop then blocked for
    `gateway_blocked` s, or `swamp`ed till the stream ends): the longest wait between two
    pieces, and the text."""
    workers = {f"w{i}": stack.start_worker(TOKENYARD_NODE_ID=f"w{i}") for i in range(2)}
    await stack.start_api()
    await stack.wait_for_model(ECHO, nodes=2)
    adverts = await watch_adverts(stack)
    frozen: list[Proc] = []
    busy: list[asyncio.Task[None]] = []

    async def freeze(n: int) -> None:
        if n < 5 or frozen:
            return
        busy = [node for node, a in adverts.latest.items() if a.slots_free < a.slots_total]
        if len(busy) != 1:  # its advert (every 0.2 s) does not say so yet: on the next piece
            return
        workers[busy[0]].signal(signal.SIGSTOP)
        frozen.append(workers[busy[0]])
        if gateway_blocked:
            await asyncio.sleep(0.1)
            time.sleep(gateway_blocked)
        if swamp:
            busy.append(asyncio.create_task(swamped()))

    try:
        pieces, finish = await streamed(stack, " ".join(WORDS) + " [[tokens=40]] [[rate=20]]", on_chunk=freeze)
    finally:
        for task in busy:
            task.cancel()
        for proc in frozen:
            proc.signal(signal.SIGCONT)
    assert frozen and finish == "stop"
    gap = max(b[0] - a[0] for a, b in zip(pieces, pieces[1:], strict=False))
    return gap, "".join(p for _, p in pieces)


async def test_a_stopped_worker_is_still_given_up_on_and_the_answer_continued(stack: Stack) -> None:
    gap, text = await stopped_mid_stream(stack, gateway_blocked=0.0)
    assert text == answer_of(40)
    assert SILENCE <= gap < 3 * SILENCE + 3.0  # given up after the silence, within its bound (and continued)
    usage = await row(stack)
    assert usage["attempts"] == 2 and usage["completion_tokens"] == 40


async def test_a_stopped_worker_on_a_lagging_gateway_is_given_up_on_within_the_bound(stack: Stack) -> None:
    """The gateway's loop blocked for 1.5 s right after the worker stopped: that time does not
    count as the attempt's silence, yet the attempt is given up on within the bound."""
    gap, text = await stopped_mid_stream(stack, gateway_blocked=1.5 * SILENCE)
    assert text == answer_of(40)
    assert 1.5 * SILENCE <= gap < 3 * SILENCE + 3.0
    usage = await row(stack)
    assert usage["attempts"] == 2 and usage["completion_tokens"] == 40


async def test_a_frozen_gateway_is_given_up_on_after_the_patience(stack: Stack) -> None:
    """A gateway process SIGSTOPped mid-stream answers no beat: its worker frees the slot once
    the patience (2 s here) ran out, not before; a SIGKILLed one at once
    (tests/test_faults_more.py)."""
    stack.start_worker(TOKENYARD_SLOTS="3", TOKENYARD_GATEWAY_PATIENCE="2")
    api, url = await stack.spawn_api()
    await stack.start_api()  # the test's own view; the stream goes through the spawned one
    await stack.wait_for_model(ECHO)
    adverts = await watch_adverts(stack)
    try:
        async with sdk(stack, url=url) as client:
            stream = await client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "long [[tokens=3000]] [[rate=50]]"}], stream=True
            )
            await stream.__anext__()
            assert await adverts.wait(lambda a: any(n.slots_free == 2 for n in a.values()), 2.0)
            api.signal(signal.SIGSTOP)
            frozen = time.monotonic()
            assert await adverts.wait(lambda a: a and all(n.slots_free == 3 for n in a.values()), 10.0)
            freed = time.monotonic() - frozen
    finally:
        api.signal(signal.SIGCONT)
    assert 1.5 <= freed < 2.0 + 3.0


async def test_a_stopped_worker_on_a_gateway_always_behind_is_given_up_on_at_the_bound(stack: Stack) -> None:
    """The gateway's loop behind 0.3 s of every 0.35 from the moment the worker stopped: the
    lag it credits would put the silence off past 6 s; the bound (3 times the silence) gives
    the attempt up at 3 s all the same."""
    gap, text = await stopped_mid_stream(stack, gateway_blocked=0.0, swamp=True)
    assert text == answer_of(40)
    assert 3 * SILENCE - 0.5 <= gap < 3 * SILENCE + 4.0
    usage = await row(stack)
    assert usage["attempts"] == 2 and usage["completion_tokens"] == 40
