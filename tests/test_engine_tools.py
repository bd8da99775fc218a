"""Tool calls on own nodes: the template path with the tiny model whose chat template takes tools
(rendering, tool_choice, forced calls by grammar), and scripted model text through the echo
backend's copy of the engine's pipeline (what the parser makes of a model's markup)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from schemas.errors import InvalidRequestError, UnsupportedError
from schemas.events import Piece, ToolCallDelta
from tests.tiny_model import TOOLS_TEMPLATE, build
from worker.backend import Finish, Usage
from worker.echo import EchoBackend
from worker.engine import TransformersBackend
from worker.engine_tools import detect_format, plan_tools, template_messages
from worker.settings import WorkerSettings
from worker.toolformats import FORMATS

TINY = "tiny"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
            "additionalProperties": False,
        },
    },
}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "Sunny, 21 C"},
]


def _request(messages: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": messages or [{"role": "user", "content": "hello"}], **extra}


@pytest.fixture
async def tools_model() -> AsyncIterator[TransformersBackend]:
    model, tokenizer = build(TOOLS_TEMPLATE, context=2048)
    backend = TransformersBackend.from_model(model, tokenizer, model_id=TINY, slots=4)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def _collect(backend: Any, request: dict[str, Any]) -> list[Any]:
    async def run() -> list[Any]:
        return [item async for item in backend.generate(request["model"], request)]

    return await asyncio.wait_for(run(), 60)


def _calls(items: list[Any], index: int = 0) -> list[dict[str, str]]:
    """What a client builds from the fragments (checking the first one names the call)."""
    calls: list[dict[str, str]] = []
    for piece in (i for i in items if isinstance(i, Piece) and i.index == index):
        for d in piece.tool_calls:
            if d.index == len(calls):
                assert d.id.startswith("call_") and d.name
                calls.append({"id": d.id, "name": d.name, "arguments": d.arguments})
            else:
                assert d.index == len(calls) - 1 and not d.id and not d.name
                calls[-1]["arguments"] += d.arguments
    return calls


def _content(items: list[Any], index: int = 0) -> str:
    return "".join(i.text for i in items if isinstance(i, Piece) and i.index == index)


# -- the template path -------------------------------------------------------------------------


async def test_the_template_decides_whether_tools_work(tools_model: TransformersBackend) -> None:
    assert tools_model._format is FORMATS["hermes"]
    tools_model.check(TINY, _request(tools=[WEATHER]))
    plain_model, tokenizer = build()
    assert detect_format(tokenizer) is None
    plain = TransformersBackend.from_model(plain_model, tokenizer, model_id=TINY, slots=1)
    await plain.start()
    try:
        with pytest.raises(UnsupportedError) as e:
            plain.check(TINY, _request(tools=[WEATHER]))
        assert e.value.param == "tools"
        plain.check(TINY, _request(tools=[WEATHER], tool_choice="none"))
    finally:
        await plain.close()


async def test_prompt_holds_the_tools_and_the_tool_history(tools_model: TransformersBackend) -> None:
    loaded = tools_model._loaded
    assert loaded is not None
    req = _request(HISTORY, tools=[WEATHER])
    text = loaded.tokenizer.decode(tools_model._prompt(req, plan_tools(req, tools_model._format)))
    assert '"name": "get_weather"' in text.split("\n</tools>")[0]  # the tool's signature
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in text
    none = tools_model._prompt(_request(HISTORY, tools=[WEATHER], tool_choice="none"))
    assert "<tools>" not in loaded.tokenizer.decode(none)
    messages = template_messages(req, FORMATS["hermes"])
    assert messages[2]["name"] == "get_weather" and messages[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris",
        "days": 1,
    }


async def test_required_forces_valid_calls(tools_model: TransformersBackend) -> None:
    # One call each: a random model would otherwise chain calls until max_tokens.
    req = _request(
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        temperature=1.0,
        seed=4,
        n=3,
    )
    items = await _collect(tools_model, req)
    assert {i.index: i.reason for i in items if isinstance(i, Finish)} == {
        0: "tool_calls",
        1: "tool_calls",
        2: "tool_calls",
    }
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for index in range(3):
        calls = _calls(items, index)
        assert calls and _content(items, index).strip() == ""  # no markup leaks into the content
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
    usage = items[-1]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == sum(i.tokens for i in items if isinstance(i, Piece))


async def test_logprobs_beside_forced_calls_are_the_content_s_only(tools_model: TransformersBackend) -> None:
    """A forced call's markup (`<tool_call>`, its JSON, `</tool_call>`, one byte a token) never
    reaches the logprobs a client is shown (`Piece.text_logprobs`): those are the content's
    tokens, in order (the newline between parallel calls is content), once each."""
    req = _request(
        tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=120, temperature=1.0, seed=3, n=2, logprobs=True
    )
    items = await _collect(tools_model, req)
    for index in range(2):
        assert _calls(items, index)
        pieces = [i for i in items if isinstance(i, Piece) and i.index == index]
        shown = b"".join(bytes(lp.bytes or ()) for p in pieces for lp in p.text_logprobs)
        assert shown.decode() == _content(items, index)
        sent = [lp for p in pieces for lp in p.logprobs]
        assert len(sent) <= sum(p.tokens for p in pieces)


async def test_a_named_function_is_called_once(tools_model: TransformersBackend) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    items = await _collect(
        tools_model, _request(tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=200, temperature=0)
    )
    calls = _calls(items)
    assert [c["name"] for c in calls] == ["get_time"]
    assert isinstance(json.loads(calls[0]["arguments"])["utc"], bool)
    assert [i.reason for i in items if isinstance(i, Finish)] == ["tool_calls"]


async def test_parallel_off_means_one_call(tools_model: TransformersBackend) -> None:
    req = _request(
        tools=[CLOCK], tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=9
    )
    items = await _collect(tools_model, req)
    assert len(_calls(items)) == 1


async def test_tool_choice_errors(tools_model: TransformersBackend) -> None:
    with pytest.raises(InvalidRequestError) as e:
        tools_model.check(
            TINY, _request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
        )
    assert e.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError):
        tools_model.check(TINY, _request(tool_choice="required"))
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}, "strict": True}}
    with pytest.raises(InvalidRequestError) as e:
        tools_model.check(TINY, _request(tools=[bad], tool_choice="required"))
    assert e.value.param == "tools"


async def test_auto_answers_or_calls_and_never_leaks_markup(tools_model: TransformersBackend) -> None:
    items = await _collect(tools_model, _request(tools=[WEATHER], max_tokens=40, temperature=1.0, seed=1, n=2))
    for index in range(2):
        assert "<tool_call>" not in _content(items, index)
        for call in _calls(items, index):
            json.loads(call["arguments"])


async def test_a_length_cut_in_a_forced_call_never_answers_with_its_markup(tools_model: TransformersBackend) -> None:
    """One byte a token, greedy: the whole forced call once, then max_tokens cuts it inside its
    `<tool_call>` marker, after it, inside the name, and inside the arguments. Never markup as
    content (nor its tokens' logprobs); once the name is out, the call with its arguments as far
    as they were generated. Every token generated is counted, markup or not."""
    base = _request(tools=[CLOCK], tool_choice="required", parallel_tool_calls=False, temperature=0, logprobs=True)
    whole = await _collect(tools_model, {**base, "max_tokens": 200})
    [call] = _calls(whole)
    usage = whole[-1]
    assert isinstance(usage, Usage) and json.loads(call["arguments"]) in ({"utc": True}, {"utc": False})
    # The call's JSON ends with its arguments and then its own "}": it is spent there.
    for cut in (5, 11, 13, 16, 22, usage.completion_tokens - 2, usage.completion_tokens - 4):
        items = await _collect(tools_model, {**base, "max_tokens": cut})
        assert [i.reason for i in items if isinstance(i, Finish)] == ["length"], cut
        assert _content(items) == "", cut
        pieces = [i for i in items if isinstance(i, Piece)]
        assert not [lp for p in pieces for lp in p.text_logprobs], cut
        assert sum(p.tokens for p in pieces) == cut, cut
        got = _calls(items)
        if cut >= usage.completion_tokens - 4:
            assert [c["name"] for c in got] == ["get_time"], cut
            args = got[0]["arguments"]
            assert args and call["arguments"].startswith(args) and args != call["arguments"], (cut, args)
        else:
            assert got == [], cut


# -- scripted model text through the echo backend -------------------------------------------------


def _echo(**kwargs: Any) -> EchoBackend:
    return EchoBackend(models=("echo",), slots=4, tokens=16, rate=0.0, context=4096, **kwargs)


async def test_echo_plays_scripted_tool_calls_through_the_parser() -> None:
    script = (
        'Checking both.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
    )
    req = {"model": "echo", "messages": [{"role": "user", "content": "[[script]]" + script}], "tools": [WEATHER, CLOCK]}
    backend = _echo()
    backend.check("echo", req)
    items = await _collect(backend, req)
    assert _content(items) == "Checking both.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in _calls(items)] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {"utc": True}),
    ]
    assert [i.reason for i in items if isinstance(i, Finish)] == ["tool_calls"]
    deltas = [d for i in items if isinstance(i, Piece) for d in i.tool_calls]
    assert len(deltas) > 4  # streamed in fragments, as the script's tokens came
    assert all(isinstance(d, ToolCallDelta) for d in deltas)
    usage = items[-1]
    assert isinstance(usage, Usage) and usage.completion_tokens == sum(i.tokens for i in items if isinstance(i, Piece))

    # Without tools (or with tool_choice none) the same text is plain content; max_tokens cuts
    # it with finish "length", the call keeping its arguments as far as they were generated.
    plain = await _collect(backend, {**req, "tools": None})
    assert _content(plain) == script and not _calls(plain)
    for cut, arguments in ((20, ""), (30, '{"')):  # just after the name; inside the arguments
        short = await _collect(backend, {**req, "max_tokens": cut})
        assert [i.reason for i in short if isinstance(i, Finish)] == ["length"]
        assert _content(short) == "Checking both."
        assert [(c["name"], c["arguments"]) for c in _calls(short)] == [("get_weather", arguments)]


async def test_echo_script_file_and_tools_refused_without_one(tmp_path: Path) -> None:
    path = tmp_path / "script.txt"
    path.write_text('<tool_call>{"name": "get_time", "arguments": {"utc": false}}</tool_call>', encoding="utf-8")
    settings = WorkerSettings.from_args(["--backend", "echo", "--echo-script", str(path)])
    backend = EchoBackend.from_settings(settings)
    req = {"model": "tokenyard/echo", "messages": [{"role": "user", "content": "what time is it?"}], "tools": [CLOCK]}
    items = await _collect(backend, req)
    assert [c["name"] for c in _calls(items)] == ["get_time"]
    with pytest.raises(UnsupportedError):
        _echo().check("echo", {**req, "model": "echo"})
