"""The cloud adapter's relaying of the OpenAI surface beyond text, against the fake provider on
127.0.0.1: tool calls streamed in small fragments (one call, parallel, interleaved) relayed
fragment by fragment and byte for byte, whole answers' tool calls, logprobs, the history and
tool options forwarded, legacy completions on `/completions` and embeddings on `/embeddings`."""

from __future__ import annotations

import itertools
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from schemas.errors import WorkerFailedError
from schemas.events import Piece, ToolCallDelta
from tests.fake_provider import Behaviour, FakeCall, FakeProvider, embedding_of
from worker.backend import Finish, Output, Usage
from worker.cloud import CloudBackend, upstream_body
from worker.cloud_answer import StreamState
from worker.providers import parse_providers

WEATHER = FakeCall("call_w1", "get_weather", ('{"ci', 'ty": "Pa', "ris", '", "unit"', ': "c"}'))
TIME = FakeCall("call_t2", "get_time", ('{"tz"', ': "Europe/', 'Paris"}'))
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
ASK = {"model": "tiny", "messages": [{"role": "user", "content": "Weather and time in Paris?"}], "tools": TOOLS}


@asynccontextmanager
async def cloud(fp: FakeProvider, **extra: Any) -> AsyncIterator[CloudBackend]:
    entry = fp.config_entry(
        "prov-s", models={"tiny": "up-tiny", "emb": "up-emb"}, prices={"*": {"input": 1.0, "output": 2.0}}, **extra
    )
    config = parse_providers({"providers": [entry]}, env={}, read_secret=lambda p: "")
    backend = CloudBackend.from_config(config, "prov-s")
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def run(backend: CloudBackend, request: dict[str, Any]) -> list[Output]:
    backend.check(request["model"], request)
    return [item async for item in backend.generate(request["model"], request)]


def fragments(items: list[Output], index: int = 0) -> list[ToolCallDelta]:
    return [c for i in items if isinstance(i, Piece) and i.index == index for c in i.tool_calls]


def arguments(calls: list[ToolCallDelta], k: int) -> str:
    return "".join(c.arguments for c in calls if c.index == k)


@pytest.mark.parametrize("interleave", [False, True])
async def test_streamed_tool_calls_are_relayed_fragment_by_fragment_in_upstream_order(interleave: bool) -> None:
    behaviour = Behaviour(chunks=(), tool_calls=(WEATHER, TIME), interleave=interleave)
    async with FakeProvider(behaviour) as fp, cloud(fp) as backend:
        items = await run(backend, {**ASK, "stream": True, "parallel_tool_calls": True})
    got = fragments(items)
    # exactly what upstream sent, in its order: each call's head (id, name), then its fragments
    heads = [ToolCallDelta(0, "call_w1", "get_weather"), ToolCallDelta(1, "call_t2", "get_time")]
    parts = [[ToolCallDelta(k, arguments=f) for f in c.fragments] for k, c in enumerate((WEATHER, TIME))]
    if interleave:  # heads together, then one fragment of each call per chunk
        expected = [*heads, *(p for row in itertools.zip_longest(*parts) for p in row if p is not None)]
    else:
        expected = [heads[0], *parts[0], heads[1], *parts[1]]
    assert got == expected
    assert arguments(got, 0) == WEATHER.arguments and arguments(got, 1) == TIME.arguments
    assert [c.name for c in got if c.name] == ["get_weather", "get_time"]
    assert [c.id for c in got if c.id] == ["call_w1", "call_t2"]
    assert Finish(0, "tool_calls") in items
    assert not any(isinstance(i, Piece) and i.text for i in items)  # no markup or text leaks


async def test_a_whole_answer_s_tool_calls_and_text_are_relayed() -> None:
    behaviour = Behaviour(chunks=("Let me check.",), tool_calls=(WEATHER,), ignore_stream=True)
    async with FakeProvider(behaviour) as fp, cloud(fp) as backend:
        items = await run(backend, ASK)
    assert [i.text for i in items if isinstance(i, Piece) and i.text] == ["Let me check."]
    assert fragments(items) == [ToolCallDelta(0, "call_w1", "get_weather", WEATHER.arguments)]
    assert Finish(0, "tool_calls") in items


async def test_tools_history_and_options_are_forwarded_as_sent() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"temp": 21}'},
    ]
    request = {
        **ASK,
        "messages": history,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
    }
    async with FakeProvider() as fp, cloud(fp) as backend:
        await run(backend, request)
        sent = fp.chat_requests()[-1].body
    for key in ("messages", "tools", "tool_choice", "parallel_tool_calls", "response_format"):
        assert sent[key] == request[key], key
    assert sent["model"] == "up-tiny" and sent["stream"] is True


@pytest.mark.parametrize("stream", [True, False])
async def test_logprobs_are_relayed_with_their_alternatives(stream: bool) -> None:
    behaviour = Behaviour(chunks=("Hel", "lo"), ignore_stream=not stream)
    async with FakeProvider(behaviour) as fp, cloud(fp) as backend:
        items = await run(backend, {**ASK, "tools": None, "logprobs": True, "top_logprobs": 2})
    lps = [lp for i in items if isinstance(i, Piece) for lp in i.logprobs]
    assert [lp.token for lp in lps] == ["Hel", "lo"]
    assert [lp.logprob for lp in lps] == [-0.25, -0.5]
    assert lps[0].bytes == tuple(b"Hel")
    assert [t.token for t in lps[1].top] == ["lo~0", "lo~1"]


async def test_a_malformed_tool_call_fails_the_attempt() -> None:
    state = StreamState(1)
    with pytest.raises(WorkerFailedError, match="malformed"):
        state.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": -1, "function": {}}]}}]})
    with pytest.raises(WorkerFailedError, match="malformed"):
        state.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 3}}]}}]})


async def test_completions_go_to_the_completions_endpoint_with_legacy_logprobs() -> None:
    request = {
        "model": "tiny",
        "tokenyard_task": "completion",
        "prompt": ["Once upon", "A time"],
        "n": 1,
        "max_completion_tokens": 5,
        "logprobs": True,
        "top_logprobs": 1,
    }
    async with (
        FakeProvider(Behaviour(chunks=("a", "b"))) as fp,
        cloud(fp, endpoints=["chat", "completions"]) as backend,
    ):
        items = await run(backend, request)
        sent = next(s for s in fp.requests if s.path.endswith("/v1/completions")).body
    assert sent["prompt"] == ["Once upon", "A time"] and sent["logprobs"] == 1 and sent["max_tokens"] == 5
    assert "tokenyard_task" not in sent and "top_logprobs" not in sent
    assert "".join(i.text for i in items if isinstance(i, Piece) and i.index == 0) == "ab"
    assert "".join(i.text for i in items if isinstance(i, Piece) and i.index == 1) == "ab #1"
    lps = [lp for i in items if isinstance(i, Piece) and i.index == 0 for lp in i.logprobs]
    assert [(lp.token, [t.token for t in lp.top]) for lp in lps] == [("a", ["a~0"]), ("b", ["b~0"])]
    assert [i for i in items if isinstance(i, Finish)] == [Finish(0, "stop"), Finish(1, "stop")]


async def test_embeddings_are_asked_as_base64_and_relayed_as_exact_float32_vectors() -> None:
    texts = ["the cat", "sat on the mat", "ok"]
    request = {"model": "emb", "tokenyard_task": "embedding", "input": texts}
    async with FakeProvider(Behaviour(embedding_dims=16)) as fp, cloud(fp, endpoints=["embeddings"]) as backend:
        items = await run(backend, request)
        sent = next(s for s in fp.requests if s.path.endswith("/v1/embeddings")).body
    assert sent == {"model": "up-emb", "input": texts, "encoding_format": "base64"}
    vectors = {i.index: i.embedding for i in items if isinstance(i, Piece)}
    for k, text in enumerate(texts):
        assert list(struct.unpack("<16f", vectors[k])) == embedding_of(text, 16)
    usage = items[-1]
    assert isinstance(usage, Usage) and usage.prompt_tokens == 7 and usage.completion_tokens == 0
    assert usage.cost == pytest.approx(7 / 1e6)


def test_upstream_body_per_task() -> None:
    chat = upstream_body({"model": "m", "messages": [], "stream": False, "logprobs": True}, "up")
    assert chat["stream"] is True and chat["logprobs"] is True and chat["model"] == "up"
    legacy = upstream_body({"model": "m", "tokenyard_task": "completion", "prompt": ["p"], "top_logprobs": 3}, "up")
    assert "logprobs" not in legacy and "top_logprobs" not in legacy
