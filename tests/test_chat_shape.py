"""Chat completions translated (`broker_api.chat_shape`): a request into a job's `Ask`, and an
interrupted answer into the request that continues it."""

from __future__ import annotations

from broker_api import chat_shape
from schemas.chat import parse_chat_request
from schemas.rules import estimate_prompt_tokens

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count to ten"}]


def test_a_request_becomes_a_job_without_what_only_the_gateway_reads() -> None:
    req = parse_chat_request(
        {"model": "m", "messages": MESSAGES, "n": 2, "max_tokens": 9, "stream": True, "stream_options": {}}
    )
    ask = chat_shape.ask(req)
    assert "stream" not in ask.body and "stream_options" not in ask.body and "temperature" not in ask.body
    assert (ask.model, ask.choices, ask.token_limit, ask.stream) == ("m", 2, 9, True)
    assert ask.prompt_estimate == estimate_prompt_tokens(MESSAGES)
    assert ask.continuation is chat_shape.continue_answer


def test_a_continuation_extends_the_original_request_with_what_is_left_of_its_budget() -> None:
    body = chat_shape.ask(parse_chat_request({"model": "m", "messages": MESSAGES, "max_tokens": 10})).body
    again = chat_shape.continue_answer(body, "one two three", 3)
    assert again["messages"] == [*MESSAGES, {"role": "assistant", "content": "one two three"}]
    assert "max_tokens" not in again and again["max_completion_tokens"] == 7
    # a second continuation starts from the original again: one assistant message, all the text
    twice = chat_shape.continue_answer(body, "one two three four five", 5)
    assert twice["messages"][-1] == {"role": "assistant", "content": "one two three four five"}
    assert len(twice["messages"]) == 3 and twice["max_completion_tokens"] == 5
    assert body["messages"] == MESSAGES  # the original is untouched
    # never a budget of zero; no budget asked, none set
    assert chat_shape.continue_answer(body, "x", 50)["max_completion_tokens"] == 1
    unbounded = chat_shape.ask(parse_chat_request({"model": "m", "messages": MESSAGES})).body
    assert "max_completion_tokens" not in chat_shape.continue_answer(unbounded, "x", 1)
