"""Billing a request whose client left mid-answer, with real processes: the stopped worker's own
count (exact prompt, every token it generated, the route's price) reaches the ledger; when the
worker is dead instead, the gateway's estimate does. Either way one row per job."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from broker_api.serving import CANCEL_REPORT_WAIT
from schemas.rules import estimate_prompt_tokens
from tests.fake_provider import Behaviour, FakeProvider
from tests.helpers import ECHO, Sse, admin, sdk, wait_rows, wait_until
from tests.stack import Stack

LONG = "alpha beta gamma delta epsilon [[tokens=2000]] [[rate=100]]"  # 20 s if nobody stops it
MODEL = "gpt-test"
PRICES = {"input": 3.0, "output": 7.0}  # USD per million tokens


async def read_then_leave(stream: Any, words: int) -> str:
    """Read the stream until `words` words arrived, then close it (the client goes away)."""
    sse = await Sse().drain(stream, until=lambda s: len(s.text.split()) >= words, timeout=10)
    await stream.close()
    return sse.text


async def rows_settled(http: httpx.AsyncClient, count: int) -> dict[str, dict[str, Any]]:
    """The ledger once it holds `count` rows, re-read after any late duplicate could have landed."""
    await wait_rows(http, count, timeout=CANCEL_REPORT_WAIT + 10)
    await asyncio.sleep(CANCEL_REPORT_WAIT + 0.5)
    rows = (await admin(http, "GET", "/usage/export", params={"format": "json"})).json()["data"]
    by_id = {f"chatcmpl-{row['job_id']}": row for row in rows}
    assert len(rows) == len(by_id) == count, rows  # one row per job, each once
    return by_id


async def test_cancelled_requests_on_an_own_node_are_billed_from_the_workers_count(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="2")
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    messages = [{"role": "user", "content": LONG}]
    async with sdk(stack) as client, httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        # the worker's exact prompt count for this prompt, as a finished request reports it
        plain = await client.chat.completions.create(model=ECHO, messages=messages, max_tokens=1)
        exact_prompt = plain.usage.prompt_tokens
        stream = await client.chat.completions.create(model=ECHO, messages=messages, stream=True)
        received = await read_then_leave(stream, 5)
        # a plain request whose client gives up after a second
        async with sdk(stack, timeout=1.0) as impatient:
            with pytest.raises(openai.APITimeoutError):
                await impatient.chat.completions.create(model=ECHO, messages=messages)
        rows = await rows_settled(http, 3)
    streamed, plain_cut = (
        next(r for r in rows.values() if r["outcome"] == "cancelled" and r["stream"] == s) for s in (True, False)
    )
    estimate = estimate_prompt_tokens(messages)
    assert exact_prompt != estimate  # so the rows below can only hold the worker's count
    assert streamed["prompt_tokens"] == plain_cut["prompt_tokens"] == exact_prompt
    # every token the client got, plus what the worker generated until the stop reached it
    # (100 tokens/s: well under a second's worth)
    assert len(received.split()) <= streamed["completion_tokens"] <= len(received.split()) + 100
    # about a second's worth, generated for a client that never saw them
    assert 1 <= plain_cut["completion_tokens"] <= 300
    assert streamed["cost"] == plain_cut["cost"] == 0.0 and streamed["route"] == plain_cut["route"] == "own"


async def test_cancelled_stream_on_a_cloud_route_costs_the_providers_prices(stack: Stack, tmp_path: Path) -> None:
    chunks = tuple(f" w{i}" for i in range(500))
    async with FakeProvider(Behaviour(chunks=chunks, chunk_delay=0.01), models=(MODEL,)) as provider:
        config = {"providers": [provider.config_entry("prov-a", prices={MODEL: PRICES})]}
        providers = tmp_path / "providers.yaml"
        providers.write_text(yaml.safe_dump(config))
        stack.start_worker(
            TOKENYARD_BACKEND="cloud",
            TOKENYARD_PROVIDERS=str(providers),
            TOKENYARD_PROVIDER="prov-a",
            TOKENYARD_NODE_ID="cloud-a",
        )
        await stack.start_api()
        await stack.wait_for_model(MODEL)
        messages = [{"role": "user", "content": "count to five hundred, slowly please"}]
        async with sdk(stack) as client, httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True)
            received = await read_then_leave(stream, 5)
            rows = await rows_settled(http, 1)
            # the stop reached upstream: the adapter closed its request
            assert await wait_until(lambda: provider.disconnects == 1, 5.0)
    [row] = rows.values()
    assert row["outcome"] == "cancelled" and row["route"] == "prov-a"
    # upstream never reported usage for the cut stream: the adapter's best-known prompt
    assert row["prompt_tokens"] == estimate_prompt_tokens(messages)
    assert len(received.split()) <= row["completion_tokens"] < len(chunks)
    expected = (row["prompt_tokens"] * PRICES["input"] + row["completion_tokens"] * PRICES["output"]) / 1e6
    assert row["cost"] > 0 and row["cost"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("client_leaves", [True, False])
async def test_worker_killed_mid_stream_is_billed_once_from_the_estimate(stack: Stack, client_leaves: bool) -> None:
    worker = stack.start_worker()
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    messages = [{"role": "user", "content": LONG}]
    async with sdk(stack) as client, httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        stream = await client.chat.completions.create(model=ECHO, messages=messages, stream=True)
        sse = await Sse().drain(stream, until=lambda s: len(s.text.split()) >= 5, timeout=15)
        worker.kill()  # SIGKILL: no final count will ever come
        if client_leaves:  # before the gateway notices the silence
            await stream.close()
        else:  # the stream ends with an error event after a few missed heartbeats
            with pytest.raises(Exception, match="interrupted"):
                await sse.drain(stream, timeout=15)
        text = sse.text
        rows = await rows_settled(http, 1)
    [row] = rows.values()
    assert row["outcome"] == ("cancelled" if client_leaves else "error")
    assert row["prompt_tokens"] == estimate_prompt_tokens(messages)
    assert len(text.split()) <= row["completion_tokens"] <= len(text.split()) + 100
    assert row["cost"] == 0.0
    assert not worker.alive() and worker.popen.returncode == -signal.SIGKILL
