"""The OpenAI surface end to end with the official `openai` SDK, on one stack per module: tool
calls (streamed fragment by fragment, parallel, whole), logprobs, `parse` with a pydantic model,
multi-turn tool loops, the Responses API (create, stream, previous_response_id, GET, DELETE,
store: false, another org's ids), legacy completions and embeddings, on a cloud route (the fake
provider), an own echo node (scripted model text) and own transformers nodes (the tiny tools
model with constrained decoding, and a tiny embedding model). Every response is checked
against OpenAI's published schema.

Read-only cases share the stack; each test sets the fake provider's behaviour it needs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
import pytest_asyncio
import yaml

from tests import tiny_embedder, tiny_model
from tests.fake_provider import Behaviour, FakeCall, FakeProvider, embedding_of
from tests.helpers import ECHO, Sse, admin, eventually, new_key
from tests.openai_schema import validate
from tests.stack import ADMIN_KEY, Stack
from worker.echo_script import tokens_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLOUD = "gpt-fake"
CLOUD_EMBED = "emb-fake"
TINY = "tiny-tools"
TINY_EMBED = "tiny-embed"
WEATHER = FakeCall("call_w1", "get_weather", ('{"ci', 'ty": "Pa', "ris", '"}'))
TIME = FakeCall("call_t2", "get_time", ('{"tz"', ': "Europe/', 'Paris"}'))
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
    },
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class Stacked:
    def __init__(self, stack: Stack, fp: FakeProvider, client: openai.AsyncOpenAI) -> None:
        self.stack, self.fp, self.client = stack, fp, client

    def set(self, behaviour: Behaviour) -> None:
        self.fp.behaviour = behaviour


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stacked]:
    tmp = tmp_path_factory.mktemp("surface")
    tools_model = tmp / "tiny-tools"
    model, tokenizer = tiny_model.build(tiny_model.TOOLS_TEMPLATE, context=4096)
    model.save_pretrained(tools_model)
    tokenizer.save_pretrained(tools_model)
    embed_model = tiny_embedder.save(tmp / "tiny-embed")
    s = Stack(tmp)
    async with FakeProvider(models=(CLOUD, CLOUD_EMBED)) as fp:
        entry = fp.config_entry(
            "fake-cloud", prices={"*": {"input": 1.0, "output": 2.0}}, endpoints=["chat", "completions", "embeddings"]
        )
        (tmp / "providers.yaml").write_text(yaml.safe_dump({"providers": [entry]}))
        try:
            s.start_nats()
            s.start_scheduler()
            s.start_worker(TOKENYARD_NODE_ID="echo-1")
            s.start_worker(
                TOKENYARD_BACKEND="cloud",
                TOKENYARD_PROVIDERS=str(tmp / "providers.yaml"),
                TOKENYARD_PROVIDER="fake-cloud",
                TOKENYARD_NODE_ID="cloud-1",
            )
            for name, path in ((TINY, tools_model), (TINY_EMBED, embed_model)):
                s.start_worker(
                    TOKENYARD_BACKEND="transformers",
                    TOKENYARD_MODEL_PATH=str(path),
                    TOKENYARD_MODELS=name,
                    TOKENYARD_NODE_ID=name,
                    TOKENYARD_SLOTS="4",
                )
            await s.start_api(request_timeout=60.0)  # the tiny torch models share two loaded cores
            for m in (ECHO, CLOUD, CLOUD_EMBED, TINY, TINY_EMBED):
                await s.wait_for_model(m, timeout=90)
            client = openai.AsyncOpenAI(base_url=f"{s.api_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
            try:
                yield Stacked(s, fp, client)
            finally:
                await client.close()
        finally:
            await s.close()


async def usage_row(env: Stacked, job_id: str) -> dict[str, Any]:
    async def found() -> bool:
        rows = (await admin(http, "GET", "/usage/export", params={"format": "json"})).json()["data"]
        hits[:] = [r for r in rows if r["job_id"] == job_id]
        return bool(hits)

    hits: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=env.stack.api_url, timeout=30) as http:
        assert await eventually(found, timeout=10)
    return hits[0]


def fragments_of(chunks: list[Any]) -> list[tuple[int, str, str, str]]:
    out = []
    for c in chunks:
        for choice in c.choices:
            calls = choice.delta.tool_calls or []
            assert len(calls) <= 1, "one tool-call fragment per chunk"
            for t in calls:
                f = t.function
                out.append((t.index, t.id or "", (f.name if f else None) or "", (f.arguments if f else None) or ""))
    return out


# --- chat: tool calls and logprobs ------------------------------------------------------------


async def test_cloud_tool_calls_whole_answer(env: Stacked) -> None:
    env.set(Behaviour(chunks=(), tool_calls=(WEATHER, TIME)))
    raw = await env.client.chat.completions.with_raw_response.create(model=CLOUD, messages=ASK, tools=TOOLS)
    validate(json.loads(raw.text), "CreateChatCompletionResponse")
    assert raw.headers["x-tokenyard-route"] == "fake-cloud"
    r = raw.parse()
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == [
        ("call_w1", "get_weather", WEATHER.arguments),
        ("call_t2", "get_time", TIME.arguments),
    ]
    assert json.loads(raw.text)["provider"] == "fake-cloud"
    sent = env.fp.chat_requests()[-1].body
    assert sent["tools"] == TOOLS and sent["model"] == CLOUD


@pytest.mark.parametrize("interleave", [False, True])
async def test_cloud_tool_calls_stream_exactly_as_upstream_sent_them(env: Stacked, interleave: bool) -> None:
    env.set(Behaviour(chunks=(), tool_calls=(WEATHER, TIME), interleave=interleave))
    stream = await env.client.chat.completions.create(
        model=CLOUD, messages=ASK, tools=TOOLS, stream=True, parallel_tool_calls=True
    )
    chunks = [c async for c in stream]
    for c in chunks:
        validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    got = fragments_of(chunks)
    heads = [(0, "call_w1", "get_weather", ""), (1, "call_t2", "get_time", "")]
    parts = [[(k, "", "", f) for f in c.fragments] for k, c in enumerate((WEATHER, TIME))]
    if interleave:
        expected = [*heads]
        for j in range(max(len(p) for p in parts)):
            expected += [p[j] for p in parts if j < len(p)]
    else:
        expected = [heads[0], *parts[0], heads[1], *parts[1]]
    assert got == expected
    for k, call in enumerate((WEATHER, TIME)):
        assert "".join(a for i, _, _, a in got if i == k) == call.arguments  # byte for byte
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_own_node_tool_loop_with_scripted_model_text(env: Stacked) -> None:
    script = '[[script]]<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    first = await env.client.chat.completions.create(
        model=ECHO, messages=[{"role": "user", "content": script}], tools=TOOLS
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    second = await env.client.chat.completions.create(
        model=ECHO,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": script},
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
            {"role": "user", "content": "[[script]]It is 21 degrees in Paris."},
        ],
    )
    assert second.choices[0].message.content == "It is 21 degrees in Paris."
    assert second.choices[0].finish_reason == "stop"


async def test_cloud_tool_loop_carries_the_history_upstream(env: Stacked) -> None:
    env.set(Behaviour(chunks=(), tool_calls=(WEATHER,)))
    first = await env.client.chat.completions.create(model=CLOUD, messages=ASK, tools=TOOLS)
    call = (first.choices[0].message.tool_calls or [])[0]
    env.set(Behaviour(chunks=("It is ", "21 degrees.")))
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    second = await env.client.chat.completions.create(model=CLOUD, messages=history, tools=TOOLS)  # type: ignore[arg-type]
    assert second.choices[0].message.content == "It is 21 degrees."
    sent = env.fp.chat_requests()[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_w1" and sent[2] == history[2]


@pytest.mark.parametrize("stream", [False, True])
async def test_cloud_logprobs(env: Stacked, stream: bool) -> None:
    env.set(Behaviour(chunks=("Hel", "lo")))
    if stream:
        s = await env.client.chat.completions.create(
            model=CLOUD, messages=ASK, logprobs=True, top_logprobs=2, stream=True
        )
        chunks = [c async for c in s]
        for c in chunks:
            validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        content = [lp for c in chunks for ch in c.choices if ch.logprobs for lp in ch.logprobs.content or []]
    else:
        raw = await env.client.chat.completions.with_raw_response.create(
            model=CLOUD, messages=ASK, logprobs=True, top_logprobs=2
        )
        validate(json.loads(raw.text), "CreateChatCompletionResponse")
        content = raw.parse().choices[0].logprobs.content or []  # type: ignore[union-attr]
    assert [(lp.token, lp.logprob, lp.bytes) for lp in content] == [
        ("Hel", -0.25, list(b"Hel")),
        ("lo", -0.5, list(b"lo")),
    ]
    assert [t.token for t in content[0].top_logprobs] == ["Hel~0", "Hel~1"]


async def test_own_node_logprobs_and_tool_calls_from_the_tiny_tools_model(env: Stacked) -> None:
    r = await env.client.chat.completions.create(
        model=TINY,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = r.choices[0]
    call = (choice.message.tool_calls or [])[0]
    assert call.function.name == "get_weather" and choice.message.content is None
    # The random model writes the city on and on: 60 tokens cut the call inside that string, and
    # the call keeps its arguments as far as they were generated, as OpenAI's API gives a cut call.
    assert choice.finish_reason == "length" and call.function.arguments.startswith('{"city": "')
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)
    lp = await env.client.chat.completions.create(
        model=TINY, messages=ASK, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content or []  # type: ignore[union-attr]
    assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
async def test_own_node_logprobs_beside_tool_calls_are_the_content_s_tokens(env: Stacked, stream: bool) -> None:
    """On the transformers engine: a forced call's markup (`<tool_call>`, its JSON, the closing
    tag) is never in `logprobs.content`; the tokens listed join to the message's content (the
    newline between parallel calls), streamed and whole."""
    clock = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"utc": {"type": "boolean"}},
                "required": ["utc"],
                "additionalProperties": False,
            },
            "strict": True,  # a call the grammar bounds: it ends well within max_tokens
        },
    }
    asks: dict[str, Any] = {
        "model": TINY,
        "messages": ASK,
        "tools": [clock],
        "tool_choice": "required",
        "max_tokens": 120,  # a call is 71 tokens: a second one is cut in its arguments, or none comes
        "temperature": 1.0,
        "seed": 7,
        "logprobs": True,
    }
    if stream:
        chunks = [c async for c in await env.client.chat.completions.create(**asks, stream=True)]
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        tokens = [lp for c in chunks for ch in c.choices if ch.logprobs for lp in ch.logprobs.content or []]
        assert fragments_of(chunks)
    else:
        r = await env.client.chat.completions.create(**asks)
        validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
        message = r.choices[0].message
        assert message.tool_calls
        text = message.content or ""
        tokens = list(r.choices[0].logprobs.content or []) if r.choices[0].logprobs else []
    assert bytes(b for lp in tokens for b in lp.bytes or ()).decode() == text


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


async def test_parse_with_a_pydantic_model_on_the_tiny_model_and_a_cloud_route(env: Stacked) -> None:
    own = await env.client.chat.completions.parse(
        model=TINY, messages=ASK, response_format=Weather, max_tokens=80, temperature=0
    )
    assert isinstance(own.choices[0].message.parsed, Weather)
    env.set(Behaviour(chunks=('{"city": ', '"Paris", ', '"celsius": 21}')))
    cloud = await env.client.chat.completions.parse(model=CLOUD, messages=ASK, response_format=Weather)
    assert cloud.choices[0].message.parsed == Weather(city="Paris", celsius=21)
    assert env.fp.chat_requests()[-1].body["response_format"]["type"] == "json_schema"


async def streamed(env: Stacked, asks: dict[str, Any]) -> tuple[str, list[Any]]:
    """A streamed chat answer's chunks, and whether it came from the cache."""
    raw = await env.client.chat.completions.with_raw_response.create(**asks, stream=True)
    return raw.headers["x-tokenyard-cache"], [c async for c in raw.parse()]


async def test_logprobs_beside_tool_calls_are_the_same_live_and_from_the_cache(env: Stacked) -> None:
    """Logprobs list the message's content tokens (OpenAI's `logprobs.content`), never a tool
    call's, though the upstream sent those too: the same streamed live, streamed from the cache
    and whole from the cache."""
    env.set(Behaviour(chunks=("Let", " me"), tool_calls=(WEATHER,), call_logprobs=True))
    messages = [{"role": "user", "content": "Weather in Lyon, with logprobs?"}]
    asks = {"model": CLOUD, "messages": messages, "tools": TOOLS, "temperature": 0, "logprobs": True, "top_logprobs": 1}

    def shape(chunks: list[Any]) -> tuple[list[str], str]:
        tokens = [lp.token for c in chunks for ch in c.choices if ch.logprobs for lp in ch.logprobs.content or []]
        return tokens, "".join(a for *_, a in fragments_of(chunks))

    hit, live = await streamed(env, asks)
    again, replayed = await streamed(env, asks)
    assert (hit, again) == ("miss", "hit")
    for c in live + replayed:
        validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert shape(live) == shape(replayed) == (["Let", " me"], WEATHER.arguments)
    raw = await env.client.chat.completions.with_raw_response.create(**asks)  # type: ignore[call-overload]
    assert raw.headers["x-tokenyard-cache"] == "hit"
    choice = raw.parse().choices[0]
    assert [lp.token for lp in choice.logprobs.content or []] == ["Let", " me"]
    assert [c.function.arguments for c in choice.message.tool_calls or []] == [WEATHER.arguments]


async def test_cached_answers_replay_tool_calls_and_idempotency_too(env: Stacked) -> None:
    env.set(Behaviour(chunks=(), tool_calls=(WEATHER,)))
    asks = {"model": CLOUD, "messages": ASK, "tools": TOOLS, "temperature": 0}
    first = await env.client.chat.completions.with_raw_response.create(**asks)  # type: ignore[arg-type]
    again = await env.client.chat.completions.with_raw_response.create(**asks)  # type: ignore[arg-type]
    assert (first.headers["x-tokenyard-cache"], again.headers["x-tokenyard-cache"]) == ("miss", "hit")
    assert again.headers["x-tokenyard-route"] == "cache"
    assert again.parse().choices[0].message.tool_calls == first.parse().choices[0].message.tool_calls
    stream = await env.client.chat.completions.create(**asks, stream=True)  # type: ignore[arg-type]
    replayed = [c async for c in stream]
    assert "".join(a for *_, a in fragments_of(replayed)) == WEATHER.arguments
    other = {**asks, "tools": TOOLS[:1]}  # tools are part of the cache key
    third = await env.client.chat.completions.with_raw_response.create(**other)  # type: ignore[arg-type]
    assert third.headers["x-tokenyard-cache"] == "miss"
    key = {"Idempotency-Key": "surface-idem-1"}
    one = await env.client.chat.completions.with_raw_response.create(
        model=CLOUD, messages=ASK, tools=TOOLS, extra_headers=key
    )
    two = await env.client.chat.completions.with_raw_response.create(
        model=CLOUD, messages=ASK, tools=TOOLS, extra_headers=key
    )
    assert two.headers["idempotent-replayed"] == "true"
    assert two.parse().choices[0].message.tool_calls == one.parse().choices[0].message.tool_calls


# --- which route served ------------------------------------------------------------------------


async def test_a_fallback_list_names_the_model_and_route_that_answered(env: Stacked) -> None:
    raw = await env.client.chat.completions.with_raw_response.create(
        model="no-such-model", messages=ASK, max_tokens=3, extra_body={"models": [ECHO]}
    )
    body = raw.parse()
    assert body.model == ECHO and raw.headers["x-tokenyard-route"] == "own"
    row = await usage_row(env, body.id.removeprefix("chatcmpl-"))
    assert row["model"] == ECHO and row["route"] == "own"


async def test_an_interrupted_cloud_stream_is_billed_for_what_was_relayed(env: Stacked) -> None:
    env.set(Behaviour(chunks=("a", "b", "c", "d"), mode="disconnect", disconnect_after=2))
    stream = await env.client.chat.completions.create(model=CLOUD, messages=ASK, stream=True)
    sse = Sse()
    with pytest.raises(openai.APIError):
        await sse.drain(stream)
    job = sse.id.removeprefix("chatcmpl-")
    row = await usage_row(env, job)
    assert row["completion_tokens"] == 2 and row["outcome"] == "error"


# --- the Responses API --------------------------------------------------------------------------

FN_TOOL: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": False,
    }
]


async def test_responses_agents_loop_on_a_cloud_route(env: Stacked) -> None:
    env.set(Behaviour(chunks=(), tool_calls=(WEATHER,)))
    raw = await env.client.responses.with_raw_response.create(
        model=CLOUD, input="Weather in Paris?", instructions="Be brief.", tools=FN_TOOL
    )
    validate(json.loads(raw.text), "Response")
    first = raw.parse()
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.call_id, call.name, call.arguments) == ("call_w1", "get_weather", WEATHER.arguments)
    assert first.status == "completed" and first.usage is not None and first.usage.total_tokens > 0
    sent = env.fp.chat_requests()[-1].body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    env.set(Behaviour(chunks=("It is ", "21 degrees.")))
    second = await env.client.responses.create(
        model=CLOUD,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}],
        tools=FN_TOOL,
    )
    assert second.output_text == "It is 21 degrees."
    history = env.fp.chat_requests()[-1].body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]  # instructions do not carry over
    assert history[1]["tool_calls"][0]["id"] == "call_w1" and history[2]["tool_call_id"] == "call_w1"
    got = await env.client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == "It is 21 degrees."


async def test_responses_agents_loop_on_an_own_node(env: Stacked) -> None:
    script = '[[script]]<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    first = await env.client.responses.create(model=ECHO, input=script, tools=FN_TOOL)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert json.loads(call.arguments) == {"city": "Paris"}
    second = await env.client.responses.create(
        model=ECHO,
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "21"},
            {"role": "user", "content": "[[script]]Sunny, 21 degrees."},
        ],
        tools=FN_TOOL,
    )
    assert second.output_text == "Sunny, 21 degrees."


async def test_responses_stream_event_sequence(env: Stacked) -> None:
    env.set(Behaviour(chunks=("Hel", "lo"), tool_calls=(WEATHER,)))
    kinds: list[str] = []
    async with env.client.responses.stream(model=CLOUD, input="hi", tools=FN_TOOL) as stream:  # type: ignore[arg-type]
        async for event in stream:
            validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
            kinds.append(event.type)
        final = await stream.get_final_response()
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(WEATHER.fragments),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.output_text == "Hello"
    assert [i.arguments for i in final.output if i.type == "function_call"] == [WEATHER.arguments]


async def test_a_responses_stream_cut_after_its_first_output_ends_with_error_and_failed(env: Stacked) -> None:
    env.set(Behaviour(chunks=("a", "b", "c"), mode="disconnect", disconnect_after=1))
    async with httpx.AsyncClient(base_url=env.stack.api_url, timeout=30) as http:
        body = {"model": CLOUD, "input": "hi", "stream": True}
        sse = await Sse().read(http, "/v1/responses", body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert sse.status == 200
    for event in sse.events:
        validate(event, "ResponseStreamEvent")
    kinds = [event["type"] for event in sse.events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-2:] == ["error", "response.failed"]


async def test_own_node_tool_calls_stream_as_fragments(env: Stacked) -> None:
    script = '[[script]]<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    stream = await env.client.chat.completions.create(
        model=ECHO, messages=[{"role": "user", "content": script}], tools=TOOLS, stream=True
    )
    chunks = [c async for c in stream]
    got = fragments_of(chunks)
    assert got[0][:3] == (0, got[0][1], "get_weather") and got[0][1].startswith("call_")
    assert json.loads("".join(a for *_, a in got)) == {"city": "Paris"}
    assert not any(ch.delta.content for c in chunks for ch in c.choices)  # no markup leaks as text
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
async def test_own_node_tool_call_cut_by_max_tokens(env: Stacked, stream: bool) -> None:
    """max_tokens cuts scripted model text inside its call's name, then inside its arguments:
    never the markup as content; the call with its arguments as far as generated, "length"."""
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    cut_in_name = len(tokens_of(text[: text.index("get_we") + len("get_we")]))
    cut_in_arguments = len(tokens_of(text[: text.index("Paris") + len("Paris")]))
    for cut, want in ((cut_in_name, []), (cut_in_arguments, [("get_weather", '{"city": "Paris')])):
        asks: dict[str, Any] = {
            "model": ECHO,
            "messages": [{"role": "user", "content": "[[script]]" + text}],
            "tools": TOOLS,
            "max_tokens": cut,
        }
        if stream:
            chunks = [c async for c in await env.client.chat.completions.create(**asks, stream=True)]
            for c in chunks:
                validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
            content = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
            fragments = fragments_of(chunks)
            calls = [(n, "".join(a for i, _, _, a in fragments if i == k)) for k, _, n, _ in fragments if n]
            finish = chunks[-1].choices[0].finish_reason
        else:
            raw = await env.client.chat.completions.with_raw_response.create(**asks)
            validate(json.loads(raw.text), "CreateChatCompletionResponse")
            choice = raw.parse().choices[0]
            content = choice.message.content or ""
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
            finish = choice.finish_reason
        assert (content, calls, finish) == ("Let me check.", want, "length"), cut


@pytest.mark.parametrize("stream", [False, True])
async def test_a_responses_function_call_cut_by_max_output_tokens_is_incomplete(env: Stacked, stream: bool) -> None:
    """The Responses API's view of the cut above: the response "incomplete" (max_output_tokens),
    the message before the call whole, the call "incomplete" with its arguments as generated;
    the stream's items say the same as the stored response."""
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    cut = len(tokens_of(text[: text.index("Paris") + len("Paris")]))
    asks: dict[str, Any] = {"model": ECHO, "input": "[[script]]" + text, "tools": FN_TOOL, "max_output_tokens": cut}
    if stream:
        events = [e async for e in await env.client.responses.create(**asks, stream=True)]
        assert events[-1].type == "response.incomplete"
        final = events[-1].response
        done = [e.item for e in events if e.type == "response.output_item.done"]
        assert [(i.type, i.status) for i in done] == [("message", "completed"), ("function_call", "incomplete")]
    else:
        final = await env.client.responses.create(**asks)
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert [(i.type, i.status) for i in final.output] == [("message", "completed"), ("function_call", "incomplete")]
    message, call = final.output
    assert message.content[0].text == "Let me check."  # type: ignore[union-attr]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris')  # type: ignore[union-attr]
    assert (await env.client.responses.retrieve(final.id)).output == final.output


async def test_stored_responses_are_per_org_and_store_false_is_honoured(env: Stacked) -> None:
    env.set(Behaviour(chunks=("kept",)))
    kept = await env.client.responses.create(model=CLOUD, input="hi")
    unkept = await env.client.responses.create(model=CLOUD, input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.retrieve(unkept.id)
    async with httpx.AsyncClient(base_url=env.stack.api_url, timeout=30) as http:
        org = (await admin(http, "POST", "/orgs", json={"name": "surface-other"})).json()
        other = await new_key(http, org=org["id"])
    async with openai.AsyncOpenAI(base_url=f"{env.stack.api_url}/v1", api_key=other["key"], max_retries=0) as theirs:
        with pytest.raises(openai.NotFoundError):
            await theirs.responses.retrieve(kept.id)
        with pytest.raises(openai.NotFoundError):
            await theirs.responses.delete(kept.id)
        with pytest.raises(openai.BadRequestError):
            await theirs.responses.create(model=CLOUD, input="x", previous_response_id=kept.id)
    await env.client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.retrieve(kept.id)


async def test_stored_responses_are_per_project_within_an_org(env: Stacked) -> None:
    """OpenAI scopes stored responses to a project: another project's key of the same org does
    not find them either."""
    env.set(Behaviour(chunks=("kept",)))
    async with httpx.AsyncClient(base_url=env.stack.api_url, timeout=30) as http:
        org = (await admin(http, "POST", "/orgs", json={"name": "surface-projects", "projects": ["a", "b"]})).json()
        a = await new_key(http, org=org["id"], project="a")
        b = await new_key(http, org=org["id"], project="b")
    url = f"{env.stack.api_url}/v1"
    async with (
        openai.AsyncOpenAI(base_url=url, api_key=a["key"], max_retries=0) as in_a,
        openai.AsyncOpenAI(base_url=url, api_key=b["key"], max_retries=0) as in_b,
    ):
        kept = await in_a.responses.create(model=CLOUD, input="hi")
        assert (await in_a.responses.retrieve(kept.id)).id == kept.id
        with pytest.raises(openai.NotFoundError):
            await in_b.responses.retrieve(kept.id)
        with pytest.raises(openai.BadRequestError):
            await in_b.responses.create(model=CLOUD, input="x", previous_response_id=kept.id)
        continued = await in_a.responses.create(model=CLOUD, input="more", previous_response_id=kept.id)
        assert continued.previous_response_id == kept.id


async def test_responses_refuse_what_they_do_not_serve(env: Stacked) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await env.client.responses.create(model=CLOUD, input="x", tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert e.value.body["param"] == "tools[0]"  # type: ignore[index]


# --- legacy completions and embeddings -----------------------------------------------------------


async def test_completions_on_an_own_node_prompt_list_and_stream(env: Stacked) -> None:
    raw = await env.client.completions.with_raw_response.create(
        model=ECHO, prompt=["one two", "three"], n=2, max_tokens=3, echo=True
    )
    validate(json.loads(raw.text), "CreateCompletionResponse")
    r = raw.parse()
    assert [c.text for c in r.choices] == ["one twoone two one", "one twoone two one", "threethree three three"] + [
        "threethree three three"
    ]
    stream = await env.client.completions.create(model=ECHO, prompt="a b", max_tokens=4, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "a b a b"


async def test_completions_on_a_cloud_route_with_logprobs(env: Stacked) -> None:
    env.set(Behaviour(chunks=("x", "y")))
    raw = await env.client.completions.with_raw_response.create(model=CLOUD, prompt="Say", logprobs=1, max_tokens=5)
    validate(json.loads(raw.text), "CreateCompletionResponse")
    choice = raw.parse().choices[0]
    assert choice.text == "xy" and choice.logprobs is not None
    assert choice.logprobs.tokens == ["x", "y"] and choice.logprobs.text_offset == [3, 4]
    assert choice.logprobs.top_logprobs == [{"x~0": -1.25}, {"y~0": -1.5}]
    sent = next(s for s in reversed(env.fp.requests) if s.path == "/v1/completions").body
    assert sent["prompt"] == ["Say"] and sent["logprobs"] == 1 and sent["max_tokens"] == 5


@pytest.mark.parametrize("model", [ECHO, CLOUD_EMBED, TINY_EMBED])
async def test_embeddings_on_every_route(env: Stacked, model: str) -> None:
    texts = ["the cat", "sat on the mat"]
    raw = await env.client.embeddings.with_raw_response.create(model=model, input=texts, encoding_format="float")
    validate(json.loads(raw.text), "CreateEmbeddingResponse")
    r = raw.parse()
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    if model == CLOUD_EMBED:
        assert r.data[1].embedding == pytest.approx(embedding_of(texts[1]))
    default = await env.client.embeddings.create(model=model, input=texts)  # the SDK asks base64
    assert default.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)


async def test_embeddings_refuse_a_batch_too_large_for_one_message(env: Stacked) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        await env.client.embeddings.create(model=ECHO, input=["x" * 1000] * 1100)
    assert e.value.status_code == 413


# --- LangChain ---------------------------------------------------------------------------------


async def test_langchain_bind_tools_on_a_cloud_route_and_an_own_node(env: Stacked) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "21 degrees"

    def chat(model: str) -> Any:
        llm = ChatOpenAI(model=model, base_url=f"{env.stack.api_url}/v1", api_key=ADMIN_KEY, max_retries=0)  # type: ignore[arg-type]
        return llm.bind_tools([get_weather])

    env.set(Behaviour(chunks=(), tool_calls=(WEATHER,)))
    asked = [HumanMessage("Weather in Paris?")]
    reply = await chat(CLOUD).ainvoke(asked)
    assert reply.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_w1", "type": "tool_call"}
    ]
    env.set(Behaviour(chunks=("21 degrees in Paris.",)))
    answer = await chat(CLOUD).ainvoke([*asked, reply, ToolMessage("21 degrees", tool_call_id="call_w1")])
    assert answer.content == "21 degrees in Paris."
    env.set(Behaviour(chunks=(), tool_calls=(WEATHER,)))
    chunks = [c async for c in chat(CLOUD).astream(asked)]
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_weather", {"city": "Paris"})]
    script = '[[script]]<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    own = await chat(ECHO).ainvoke([HumanMessage(script)])
    assert [(c["name"], c["args"]) for c in own.tool_calls] == [("get_weather", {"city": "Oslo"})]
