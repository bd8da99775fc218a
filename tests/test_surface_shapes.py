"""The translations of the Responses API, legacy completions and embeddings, as pure functions:
requests into jobs (history, tools, formats, logprobs, the task), outcomes into OpenAI's JSON
(checked against the published schema), and the Responses event sequence for text and calls."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from broker_api import completions_shape, embeddings_shape, responses, responses_stream
from broker_api.billing import Charge
from broker_api.output import ChoiceResult, Output
from broker_api.session import Session
from schemas.completions import parse_completion_request
from schemas.embeddings import parse_embedding_request
from schemas.errors import RequestTooLargeError, UnsupportedError
from schemas.events import Piece, TokenLogprob, ToolCallDelta, TopLogprob
from schemas.responses import StoredResponse, parse_response_request
from tests.openai_schema import validate

CALL = (ToolCallDelta(0, "call_1", "f", ""), ToolCallDelta(0, arguments='{"a": '), ToolCallDelta(0, arguments="1}"))


def session(ask: Any, route: str = "") -> Session:
    """A session whose job was placed on `route` (what `billing.served_by` names)."""
    from broker_api.auth import Principal
    from broker_api.jobrun import JobRun
    from schemas.jobs import Job, Submission

    job = Job(id="ab" * 16, model=ask.model, request=ask.body, reply="r", deadline=0.0)
    who = Principal(org="org", key_id="key", admin=False)
    run = JobRun(job, silence=1.0)
    run.placed(0, route)
    return Session(ask=ask, who=who, job=job, sub=Submission(job=job), run=run, output=Output(ask.choices))


def test_responses_history_becomes_chat_messages() -> None:
    previous = StoredResponse({}, [{"role": "user", "content": "Weather?"}])
    req = parse_response_request(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "1"},
                {"role": "developer", "content": [{"type": "input_text", "text": "Use Celsius."}]},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
            "max_output_tokens": 64,
            "top_logprobs": 2,
        }
    )
    ask, conversation = responses.ask(req, previous)
    body = ask.body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert conversation == body["messages"][1:]  # what is stored: without the instructions
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "system"]
    assert [c["id"] for c in conversation[1]["tool_calls"]] == ["c1", "c2"]  # parallel calls: one turn
    assert body["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
    }
    assert (body["max_completion_tokens"], body["logprobs"], body["top_logprobs"]) == (64, True, 2)


def test_a_response_with_text_and_a_call_is_valid_and_its_stream_is_in_order() -> None:
    req = parse_response_request({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}]})
    ask, _ = responses.ask(req, None)
    s = session(ask, "prov")
    lp = TokenLogprob("Hi", -0.1, None, (TopLogprob("Hi", -0.1),))
    result = ChoiceResult("Hi", "tool_calls", CALL, (lp,))
    final = responses.Shaper(req, s).final(result, Charge(3, 4))
    body = final.model_dump(mode="json")
    validate(body, "Response")
    assert (body["model"], body["provider"]) == ("m", "prov")
    assert json.dumps(body["tools"]) == '[{"type": "function", "name": "f", "strict": null, "parameters": null}]'
    assert [o["type"] for o in body["output"]] == ["message", "function_call"]
    assert body["output"][1]["arguments"] == '{"a": 1}' and body["usage"]["total_tokens"] == 7
    writer = responses_stream.EventWriter(responses.Shaper(req, s))
    events = [*writer.start(), *writer.piece(Piece(0, "Hi", 1, CALL, (lp,))), *writer.end(final)]
    for _, data in events:
        validate(json.loads(data), "ResponseStreamEvent")
    assert [json.loads(d)["sequence_number"] for _, d in events] == list(range(len(events)))
    assert [k for k, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_completions_translate_to_a_raw_prompt_job_and_back() -> None:
    req = parse_completion_request(
        {"model": "m", "prompt": ["ab", "cd"], "n": 2, "logprobs": 1, "provider": {"only": ["x"]}}
    )
    ask = completions_shape.ask(req)
    assert ask.body["tokenyard_task"] == "completion" and ask.body["prompt"] == ["ab", "cd"]
    assert (ask.body["max_tokens"], ask.body["logprobs"], ask.body["top_logprobs"]) == (16, True, 1)
    assert ask.choices == 4 and ask.continuation is None and ask.body["provider"] == {"only": ["x"]}
    lps = (TokenLogprob("x", -1.0, None, (TopLogprob("x", -1.0),)), TokenLogprob("yz", -2.0))
    results = [ChoiceResult("xyz", "length", (), lps)] * 4
    body = completions_shape.completion(req, session(ask), results, Charge(2, 8)).model_dump()
    validate(body, "CreateCompletionResponse")
    assert body["choices"][2]["logprobs"]["text_offset"] == [2, 3]  # after the prompt "cd"
    assert body["choices"][0]["logprobs"]["top_logprobs"] == [{"x": -1.0}, {}]
    with pytest.raises(UnsupportedError):
        completions_shape.ask(parse_completion_request({"model": "m", "prompt": "p", "echo": True, "logprobs": 1}))
    single = completions_shape.ask(parse_completion_request({"model": "m", "prompt": "Once", "max_tokens": 5}))
    assert single.continuation is not None
    assert single.continuation(single.body, " upon", 2)["prompt"] == ["Once upon"]


def test_embeddings_translate_and_refuse_a_batch_too_large() -> None:
    req = parse_embedding_request({"model": "e", "input": ["a", "b"], "encoding_format": "base64"})
    ask = embeddings_shape.ask(req)
    assert ask.body == {"tokenyard_task": "embedding", "model": "e", "input": ["a", "b"]} and ask.choices == 2
    vector = struct.pack("<2f", 0.5, -0.25)
    results = [ChoiceResult("", "stop", embedding=vector)] * 2
    body = embeddings_shape.embedding_list(req, session(ask, "p"), results, Charge(5, 0)).model_dump()
    assert body["data"][0]["embedding"] == "AAAAPwAAgL4=" and body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert (body["model"], body["provider"]) == ("e", "p")
    floats = parse_embedding_request({"model": "e", "input": ["a", "b"]})
    validate(
        embeddings_shape.embedding_list(
            floats, session(embeddings_shape.ask(floats)), results, Charge(5, 0)
        ).model_dump(exclude_none=True),
        "CreateEmbeddingResponse",
    )
    with pytest.raises(RequestTooLargeError):
        embeddings_shape.ask(parse_embedding_request({"model": "e", "input": ["x" * 1000] * 1100}))
