"""Issue 11, case 7: after the first token, a cloud route's failure is continued by default on
a route that takes the delivered text as an assistant prefix.

Two cloud adapters in front of fake providers; the client prefers A. A cuts its stream, stalls
it, or sends a malformed chunk after three chunks; B declares `assistant_prefill` and continues
a trailing assistant message as providers with prefill do. The client sees one uninterrupted,
correct stream, billed once for what it got. Where no route declares prefill, the stream ends
with what really failed at A, never with the scheduler's refusal of the continuation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.fake_provider import Behaviour, FakeProvider
from tests.helpers import Sse, sdk, wait_rows
from tests.stack import Stack, auth_headers

MODEL = "fake-model"
CHUNKS = ("one", " two", " three", " four", " five", " six")
PREFER_A = {"provider": {"order": ["prov-a", "prov-b"]}}

FAILURES = {
    "cut": Behaviour(mode="disconnect", disconnect_after=3, chunks=CHUNKS),
    "stalled": Behaviour(mode="stall", disconnect_after=3, chunks=CHUNKS),
    "malformed": Behaviour(mode="malformed", disconnect_after=3, chunks=CHUNKS),
}


def entry(fp: FakeProvider, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "base_url": fp.base_url,
        "api_keys": [f"sk-{name}"],
        "models": {MODEL: MODEL},
        "probe_interval": 0,
        "timeouts": {"connect": 1, "first_token": 5, "read": 1, "total": 20},
    } | extra


async def two_routes(stack: Stack, tmp_path: Path, a: FakeProvider, b: FakeProvider, *, prefill: bool) -> None:
    providers = tmp_path / "providers.yaml"
    providers.write_text(
        yaml.safe_dump({"providers": [entry(a, "prov-a"), entry(b, "prov-b", assistant_prefill=prefill)]})
    )
    for name in ("prov-a", "prov-b"):
        stack.start_worker(
            TOKENYARD_BACKEND="cloud",
            TOKENYARD_PROVIDERS=str(providers),
            TOKENYARD_PROVIDER=name,
            TOKENYARD_NODE_ID=f"node-{name}",
            TOKENYARD_SLOTS="8",
        )
    await stack.start_api()
    await stack.wait_for_model(MODEL, nodes=2)


async def stream_text(client: openai.AsyncOpenAI) -> Sse:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body=PREFER_A,
    )
    return await Sse().drain(stream)


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_broken_cloud_stream_is_continued_on_a_route_that_takes_the_prefix(
    stack: Stack, tmp_path: Path, failure: str
) -> None:
    async with (
        FakeProvider(FAILURES[failure], models=(MODEL,)) as a,
        FakeProvider(Behaviour(chunks=CHUNKS, prefill=True), models=(MODEL,)) as b,
    ):
        await two_routes(stack, tmp_path, a, b, prefill=True)
        async with sdk(stack) as client:
            sse = await stream_text(client)
        [continued] = b.chat_requests()
    assert sse.text == "".join(CHUNKS) and sse.finish == "stop"  # nothing missing, nothing twice
    # B was asked to carry on from exactly what the client had
    assert continued.body["messages"][-1] == {"role": "assistant", "content": "one two three"}
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers()) as http:
        [row] = await wait_rows(http, 1)
    assert row["outcome"] == "ok" and row["attempts"] == 2 and row["route"] == "prov-b", row
    assert sse.usage is not None and row["completion_tokens"] == sse.usage["completion_tokens"] == len(CHUNKS), row


async def test_with_no_route_taking_the_prefix_the_stream_ends_with_what_really_failed(
    stack: Stack, tmp_path: Path
) -> None:
    async with (
        FakeProvider(FAILURES["cut"], models=(MODEL,)) as a,
        FakeProvider(Behaviour(chunks=CHUNKS), models=(MODEL,)) as b,
    ):
        await two_routes(stack, tmp_path, a, b, prefill=False)
        async with sdk(stack) as client:
            with pytest.raises(openai.APIError) as e:
                await stream_text(client)
        assert b.chat_requests() == []  # never asked to start the answer again after the text
    message = str(e.value)
    assert "interrupted" in message and "prov-a" in message, message
    assert "continue" not in message, message  # not the scheduler's refusal of the continuation
