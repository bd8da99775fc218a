"""The OpenAI surface's wire and protocol models: tool-call and logprob chunks against OpenAI's
schema, the structured pieces and cached answers on the codec (round trips, old answers still
read, garbage refused), a job's task, and the request models of completions, embeddings and the
Responses API (what they refuse, naming the parameter)."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from broker_api.output import Output
from schemas.answers import CachedAnswer
from schemas.chat import ChatCompletionChunk, parse_chat_request, tool_calls_json
from schemas.chunks import ChunkEncoder
from schemas.codec import WireError, pack
from schemas.completions import parse_completion_request
from schemas.embeddings import parse_embedding_request
from schemas.errors import InvalidRequestError
from schemas.events import Delta, Done, Piece, TokenLogprob, ToolCallDelta, TopLogprob, decode_event
from schemas.responses import MAX_PARTS, StoredParts, StoredResponse, decode_stored, parse_response_request
from schemas.rules import estimate_request_prompt
from schemas.tasks import choices, prompts, task_of
from tests.openai_schema import validate

LP = TokenLogprob("Hi", -0.5, tuple(b"Hi"), (TopLogprob("Hi", -0.5, tuple(b"Hi")), TopLogprob("Yo", -1.5)))
CALLS = (ToolCallDelta(0, "call_1", "f", ""), ToolCallDelta(0, arguments='{"a"'), ToolCallDelta(0, arguments=": 1}"))


def test_tool_call_fragments_and_logprobs_make_valid_chunks() -> None:
    enc = ChunkEncoder(id="chatcmpl-x", created=1, model="m", include_usage=False, provider="prov")
    chunks = [enc.tool_call(0, c) for c in CALLS] + [enc.content(0, "Hi", [LP]), enc.finish(0, "tool_calls")]
    parsed = [json.loads(c) for c in chunks]
    for c in parsed:
        validate(c, "CreateChatCompletionStreamResponse")
        ChatCompletionChunk.model_validate(c)
        assert c["provider"] == "prov"
    first = parsed[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    assert first["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    ]
    assert parsed[1]["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}
    lp = parsed[3]["choices"][0]["logprobs"]["content"][0]
    assert lp == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
            {"token": "Yo", "logprob": -1.5, "bytes": None},
        ],
    }


def test_a_piece_makes_one_chunk_per_fragment_after_its_text() -> None:
    enc = ChunkEncoder(id="c", created=1, model="m", include_usage=False)
    out = enc.piece(Piece(0, "Let me look.", 3, CALLS))
    assert len(out) == 1 + len(CALLS) and '"content":"Let me look."' in out[0]


def test_a_call_s_logprobs_are_shown_neither_streamed_nor_in_the_whole_answer() -> None:
    """`Piece.text_logprobs`: the one rule the chunks and the gateway's output (whole answers,
    the cache) follow, so a cached and a live answer show the same logprobs."""
    enc = ChunkEncoder(id="c", created=1, model="m", include_usage=False)
    call = Piece(0, "", 2, CALLS, (LP, LP))
    assert all('"logprobs":null' in c for c in enc.piece(call)) and len(enc.piece(call)) == len(CALLS)
    assert '"token":"Hi"' in enc.piece(Piece(0, "Hi", 1, CALLS, (LP,)))[0]  # with text: the text's
    output = Output(1)
    output.add(Delta("j", 0, 0, "n", (Piece(0, "Hi", 1, (), (LP,)), call)))
    (result,) = output.results(Done("j", 0, 1, "n", ("tool_calls",), 1, 3))
    assert result.logprobs == (LP,) and result.tool_calls == CALLS


def test_tool_calls_json_joins_each_call_s_fragments_in_order() -> None:
    fragments = (*CALLS, ToolCallDelta(1, "call_2", "g", "{}"))
    assert tool_calls_json(fragments) == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


def test_pieces_with_vectors_round_trip_and_bad_vectors_are_refused() -> None:
    vector = struct.pack("<3f", 0.5, -1.0, 2.0)
    ev = Delta("j", 1, 0, "n", (Piece(0, embedding=vector), Piece(1, "x", 1, CALLS, (LP,))))
    assert decode_event(ev.encode()) == ev
    with pytest.raises(WireError):
        decode_event(pack({"k": "delta", "j": "j", "a": 1, "s": 0, "p": [[0, "", 0, [], [], b"abc"]]}))


def test_cached_answers_keep_tool_calls_logprobs_vectors_and_what_served() -> None:
    answer = CachedAnswer(
        ["", "hi"],
        ["tool_calls", "stop"],
        7,
        9,
        0.25,
        tool_calls=[CALLS, ()],
        logprobs=[(), (LP,)],
        vectors=[b"\x00\x00\x80?"],
        model="m2",
        route="prov",
    )
    assert CachedAnswer.decode(answer.encode()) == answer
    old = pack({"t": ["a"], "f": ["stop"], "pt": 1, "ct": 2, "c": 0.0})  # written before these fields
    read = CachedAnswer.decode(old)
    assert read.calls_of(0) == () and read.logprobs_of(0) == () and read.model == "" and read.vectors == []
    with pytest.raises(WireError):
        CachedAnswer.decode(pack({"t": ["a"], "f": ["stop"], "pt": 1, "ct": 2, "tc": [[["x"]]]}))


def test_a_job_s_task_and_its_choices() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "n": 2}
    completion = {"tokenyard_task": "completion", "prompt": ["abcd", "efgh"], "n": 3}
    embedding = {"tokenyard_task": "embedding", "input": ["a", "b", "c"]}
    assert [task_of(r) for r in (chat, completion, embedding)] == ["chat", "completion", "embedding"]
    assert [choices(r) for r in (chat, completion, embedding)] == [2, 6, 3]
    assert prompts(completion) == ["abcd", "efgh"] and prompts(chat) == []
    assert estimate_request_prompt(completion) == 4 and estimate_request_prompt(chat) == 5


def test_a_client_cannot_name_a_task() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tokenyard_task": "embedding"}
    for parse, extra in (
        (parse_chat_request, {}),
        (parse_completion_request, {"prompt": "x"}),
        (parse_embedding_request, {"input": "x"}),
        (parse_response_request, {"input": "x"}),
    ):
        with pytest.raises(InvalidRequestError, match="tokenyard_task"):
            parse({**body, **extra})


def test_completion_and_embedding_requests() -> None:
    assert parse_completion_request({"model": "m", "prompt": "p"}).prompts == ["p"]
    for bad, param in (
        ({"prompt": [1, 2]}, ""),
        ({"prompt": "p", "logprobs": 6}, "logprobs"),
        ({"prompt": []}, "prompt"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            parse_completion_request({"model": "m", **bad})
        assert (e.value.param or "") == param
    assert parse_embedding_request({"model": "m", "input": ["a", "b"]}).inputs == ["a", "b"]
    bads: list[dict[str, Any]] = [{"input": [[1, 2]]}, {"input": []}, {"input": "a", "encoding_format": "hex"}]
    for bad in bads:
        with pytest.raises(InvalidRequestError):
            parse_embedding_request({"model": "m", **bad})


def test_response_requests_refuse_what_is_not_served_naming_it() -> None:
    ok = parse_response_request(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        }
    )
    assert [i.type for i in ok.input] == ["message", "function_call", "function_call_output"]  # type: ignore[union-attr]
    for bad, param in (
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"background": True}, "background"),
        ({"max_output_tokens": 5}, "max_output_tokens"),
        ({"tools": 5}, "tools"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            parse_response_request({"model": "m", "input": "x", **bad})
        assert e.value.param == param


def test_stored_responses_round_trip() -> None:
    stored = StoredResponse({"id": "resp_1", "output": []}, [{"role": "user", "content": "hi"}])
    assert StoredResponse.decode(stored.encode()) == stored
    with pytest.raises(WireError):
        StoredResponse.decode(pack({"resp": [], "msgs": []}))
    # a bucket's head is either the response itself or the head of one kept in parts
    assert decode_stored(stored.encode()) == stored
    head = StoredParts(3, 1_300_000, "ab" * 32)
    assert decode_stored(head.encode()) == head
    for bad in (
        {"parts": 0, "size": 1, "sha256": "x"},
        {"parts": MAX_PARTS + 1, "size": 1, "sha256": "x"},
        {"parts": 2, "size": -1, "sha256": "x"},
        {"parts": 2, "size": 1, "sha256": None},
        {"parts": 2, "size": 1},
    ):
        with pytest.raises(WireError):
            decode_stored(pack(bad))
