"""Issue 11, case 2: health follows the node. One node of a pool dies (SIGKILL) or freezes
(SIGSTOP) with streams in flight: only its own streams end (with an error event), and its
sibling in the same pool serves every request after, with no window of 503s."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import ECHO, Sse, sdk, wait_rows, watch_adverts
from tests.stack import Stack, auth_headers

STREAMS = 12
AFTER = 50


async def read_stream(stream: Any) -> tuple[str, str]:
    """(text, error message or "") of a stream read to its end."""
    sse = Sse()
    try:
        await sse.drain(stream, timeout=60)
    except openai.APIError as e:
        return sse.text, e.message
    return sse.text, ""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
async def test_one_nodes_death_moves_traffic_to_its_sibling(stack: Stack, sig: int) -> None:
    workers = {f"w{i}": stack.start_worker(TOKENYARD_NODE_ID=f"w{i}", TOKENYARD_SLOTS="64") for i in range(2)}
    # the scenario: the victim's streams end with an error event (not continued on the
    # sibling, which continuation by default would do: tests/test_continuation.py)
    await stack.start_api(continuation_models="")
    await stack.wait_for_model(ECHO, nodes=2)
    adverts = await watch_adverts(stack)
    async with sdk(stack) as client:
        streams = [
            await client.chat.completions.create(
                model=ECHO,
                messages=[{"role": "user", "content": f"s{i} [[tokens=400]] [[rate=20]]"}],
                stream=True,
            )
            for i in range(STREAMS)
        ]
        firsts = [await s.__anext__() for s in streams]  # every stream has started
        assert all(f.choices[0].delta.content for f in firsts)
        # both nodes' adverts, not only the sum: a heartbeat watch that started after the streams
        # may have heard only the busier node so far
        assert await adverts.wait(
            lambda a: set(a) == set(workers) and sum(64 - n.slots_free for n in a.values()) == STREAMS, 10.0
        )
        busy = {node: 64 - a.slots_free for node, a in adverts.latest.items()}
        victim_id = max(busy, key=lambda n: busy[n])
        sibling_id = next(n for n in busy if n != victim_id)
        assert busy[victim_id] > 0
        victim = workers[victim_id]
        victim.signal(sig)
        readers = [asyncio.create_task(read_stream(s)) for s in streams]
        try:
            # Streams on the victim end with an error within a few heartbeats; the sibling's go on.
            async with asyncio.timeout(10):
                while sum(1 for r in readers if r.done()) < busy[victim_id]:
                    await asyncio.sleep(0.05)
            ended = [r.result() for r in readers if r.done()]
            assert all("interrupted" in error for _, error in ended), ended
            # Every request from now on is answered, by the sibling.
            answers = []
            for i in range(AFTER):
                r = await client.chat.completions.create(
                    model=ECHO, messages=[{"role": "user", "content": f"after {i}"}], max_tokens=2
                )
                answers.append(r.choices[0].message.content)
            assert answers == [f"after {i} "[: len(f"after {i}")] for i in range(AFTER)]
            assert sum(1 for r in readers if r.done()) == busy[victim_id]  # the sibling's streams go on
            for s in streams:
                await s.close()
            async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers(), timeout=30) as http:
                rows = await wait_rows(http, STREAMS + AFTER, timeout=20)
            after = [r for r in rows if r["outcome"] == "ok" and r["completion_tokens"] == 2]
            assert len(after) == AFTER and {r["node"] for r in after} == {sibling_id}
            failed = [r for r in rows if r["outcome"] == "error"]
            assert len(failed) == busy[victim_id] and {r["node"] for r in failed} == {victim_id}
        finally:
            for t in readers:
                t.cancel()
            victim.signal(signal.SIGCONT)
