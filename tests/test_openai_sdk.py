"""The official OpenAI SDK against a running stack, unchanged: plain and streamed completions,
models, and responses that validate against OpenAI's published schemas."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import ECHO
from tests.openai_schema import validate
from tests.stack import Stack, auth_headers

# Requests that leave nothing a later test could see: one stack for the module.
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_plain_completion(shared_client: openai.AsyncOpenAI) -> None:
    client = shared_client
    r = await client.chat.completions.create(
        model=ECHO,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}],
        max_tokens=5,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "one two three one two"
    assert r.choices[0].finish_reason == "length"
    # prompt: 2 + 3 words, plus 3 per message
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 5, 16)
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")


async def test_natural_stop_and_stop_sequences(shared_client: openai.AsyncOpenAI) -> None:
    client = shared_client
    r = await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "a b c [[tokens=3]]"}])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("a b c", "stop")
    r = await client.chat.completions.create(
        model=ECHO, messages=[{"role": "user", "content": "a b c d"}], stop=["c d"]
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("a b ", "stop")


async def test_streamed_completion(shared_client: openai.AsyncOpenAI) -> None:
    client = shared_client
    stream = await client.chat.completions.create(
        model=ECHO,
        messages=[{"role": "user", "content": "hello streaming world [[tokens=40]]"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, ids = "", None, None, set()
    async for chunk in stream:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    words = ("hello streaming world " * 14).split()[:40]
    assert text == " ".join(words)
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 40 and usage.prompt_tokens == 6
    assert len(ids) == 1


async def test_n_choices(shared_client: openai.AsyncOpenAI) -> None:
    client = shared_client
    r = await client.chat.completions.create(
        model=ECHO, messages=[{"role": "user", "content": "x y"}], n=3, max_tokens=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "x y" for c in r.choices)
    assert r.usage.completion_tokens == 6


async def test_models(shared_client: openai.AsyncOpenAI) -> None:
    client = shared_client
    models = await client.models.list()
    assert [m.id for m in models.data] == [ECHO]
    validate(models.model_dump(exclude_unset=True), "ListModelsResponse")
    m = await client.models.retrieve(ECHO)
    assert m.id == ECHO and m.object == "model"
    validate(m.model_dump(exclude_unset=True), "Model")


async def test_raw_sse_framing(shared_echo_stack: Stack) -> None:
    body = {"model": ECHO, "messages": [{"role": "user", "content": "p q [[tokens=2]]"}], "stream": True}
    async with httpx.AsyncClient(base_url=shared_echo_stack.api_url, headers=auth_headers()) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"]
            raw = (await r.aread()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
