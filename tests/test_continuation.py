"""Mid-stream continuation: when the node streaming an answer dies, another node continues
from the text already delivered, and the client sees one uninterrupted stream."""

from __future__ import annotations

import time

import httpx

from tests.helpers import ECHO, Sse, sdk, wait_rows
from tests.stack import Stack, auth_headers

WORDS = "alpha beta gamma delta epsilon".split()


async def test_a_dead_node_is_continued_by_another(stack: Stack) -> None:
    for i in range(2):
        stack.start_worker(TOKENYARD_NODE_ID=f"w{i}")
    await stack.start_api()  # continuation is the default
    await stack.wait_for_model(ECHO, nodes=2)
    prompt = " ".join(WORDS) + " [[tokens=30]] [[rate=25]] [[die-after=10]]"
    expected = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    async with sdk(stack) as client:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model=ECHO,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
        sse = await Sse().drain(stream)
    assert sse.text == expected  # nothing missing, nothing twice
    assert sse.finish == "stop"
    assert sse.usage is not None and sse.usage["completion_tokens"] == 30
    assert time.monotonic() - started < 10
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers()) as http:
        rows = await wait_rows(http, 1)
    assert rows[0]["completion_tokens"] == 30 and rows[0]["attempts"] == 2 and rows[0]["outcome"] == "ok"


async def test_with_continuation_turned_off_the_stream_ends_with_an_error(stack: Stack) -> None:
    for i in range(2):
        stack.start_worker(TOKENYARD_NODE_ID=f"w{i}")
    await stack.start_api(continuation_models="")
    await stack.wait_for_model(ECHO, nodes=2)
    async with sdk(stack) as client:
        stream = await client.chat.completions.create(
            model=ECHO,
            messages=[{"role": "user", "content": "x [[tokens=30]] [[rate=25]] [[die-after=5]]"}],
            stream=True,
        )
        sse = Sse()
        try:
            await sse.drain(stream)
            raised = False
        except Exception as e:  # noqa: BLE001 - the SDK raises APIError for the error event
            raised = "interrupted" in str(e)
    assert raised
    assert sse.text.split() == ["x"] * 5
