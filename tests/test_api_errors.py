"""Every bad input gets OpenAI's error object with the right status: never a 422, a 500 or a
dropped connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from schemas import subjects
from schemas.errors import ContentionError
from schemas.jobs import Admission
from tests.helpers import ECHO, sdk
from tests.stack import Stack, auth_headers

USER = [{"role": "user", "content": "hi"}]

# None of these changes anything a later test could see: one stack for the module.
pytestmark = pytest.mark.asyncio(loop_scope="module")


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"]
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(shared_echo_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shared_echo_stack.api_url, headers=auth_headers(), timeout=30) as c:
        yield c


BAD_BODIES = [
    ({"messages": USER}, "model", "missing_required_parameter"),
    ({"model": ECHO}, "messages", "missing_required_parameter"),
    ({"model": ECHO, "messages": []}, "messages", "invalid_value"),
    ({"model": ECHO, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]", "invalid_value"),
    ({"model": ECHO, "messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    (
        {"model": ECHO, "messages": [{"role": "tool", "content": "x"}]},
        "messages[0].tool_call_id",
        "missing_required_parameter",
    ),
    (
        {"model": ECHO, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0]",
        "invalid_value",
    ),
    ({"model": ECHO, "messages": USER, "temperature": 3}, "temperature", "invalid_value"),
    ({"model": ECHO, "messages": USER, "top_p": -0.1}, "top_p", "invalid_value"),
    ({"model": ECHO, "messages": USER, "n": 0}, "n", "invalid_value"),
    ({"model": ECHO, "messages": USER, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"model": ECHO, "messages": USER, "max_tokens": "many"}, "max_tokens", "invalid_value"),
    ({"model": ECHO, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"model": ECHO, "messages": USER, "presence_penalty": 9}, "presence_penalty", "invalid_value"),
    ({"model": ECHO, "messages": USER, "stream_options": {"include_usage": True}}, None, "invalid_value"),
    ({"model": ECHO, "messages": USER, "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
    ({"model": ECHO, "messages": USER, "response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_BODIES)
async def test_invalid_bodies_are_400(
    http: httpx.AsyncClient, body: dict[str, Any], param: str | None, code: str
) -> None:
    err = _error(await http.post("/v1/chat/completions", json=body), 400)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)


async def test_unparseable_json_is_400(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert _error(r, 400)["code"] == "invalid_json"
    r = await http.post("/v1/chat/completions", json=["not", "an", "object"])
    assert "JSON object" in _error(r, 400)["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": ECHO, "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"model": ECHO, "messages": USER, "response_format": {"type": "json_object"}},
        {"model": ECHO, "messages": USER, "logprobs": True},
        {"model": ECHO, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_what_the_model_cannot_do_is_400(http: httpx.AsyncClient, body: dict[str, Any], stream: bool) -> None:
    """Refused by the worker's backend, before any byte: an HTTP 400 for streams too."""
    err = _error(await http.post("/v1/chat/completions", json={**body, "stream": stream}), 400)
    assert err["code"] in {"unsupported_parameter", "unsupported_value"}
    assert err["param"]


async def test_context_length_is_400(http: httpx.AsyncClient) -> None:
    err = _error(
        await http.post("/v1/chat/completions", json={"model": ECHO, "messages": USER, "max_tokens": 5000}), 400
    )
    assert err["code"] == "context_length_exceeded"
    assert "4096" in err["message"]


async def test_auth(shared_echo_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=shared_echo_stack.api_url) as http:
        body = {"model": ECHO, "messages": USER}
        err = _error(await http.post("/v1/chat/completions", json=body), 401)
        assert "API key" in err["message"]
        wrong = "ty_admin_this-is-not-the-right-key"
        err = _error(
            await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {wrong}"}), 401
        )
        assert err["code"] == "invalid_api_key"
        assert wrong not in err["message"]
        _error(await http.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)


async def test_unknown_model_route_and_method(http: httpx.AsyncClient) -> None:
    err = _error(await http.post("/v1/chat/completions", json={"model": "no/such-model", "messages": USER}), 404)
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    err = _error(await http.get("/v1/models/no/such-model"), 404)
    assert err["code"] == "model_not_found"
    err = _error(await http.post("/v1/nothing-here", json={}), 404)
    assert "/v1/nothing-here" in err["message"]
    _error(await http.get("/v1/chat/completions"), 405)


async def test_oversized_body_is_413(http: httpx.AsyncClient) -> None:
    huge = {"model": ECHO, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    _error(
        await http.post(
            "/v1/chat/completions", content=json.dumps(huge).encode(), headers={"content-type": "application/json"}
        ),
        413,
    )

    async def chunks():  # no content-length: the limit holds while reading
        for _ in range(6):
            yield b"x" * (1 << 20)

    _error(await http.post("/v1/chat/completions", content=chunks()), 413)


async def test_sdk_raises_typed_errors(shared_client: openai.AsyncOpenAI) -> None:
    client = shared_client
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=ECHO, messages=USER, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=ECHO, messages=USER, stream=True, response_format={"type": "json_object"}
        )


async def test_unknown_fields_are_accepted(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/chat/completions",
        json={"model": ECHO, "messages": USER, "max_tokens": 1, "provider_extra": {"x": 1}, "store": False},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hi"


async def test_a_503_from_the_scheduler_reaches_the_client_as_a_503(tmp_path: Path) -> None:
    """A scheduler refusing with ContentionError (limit counters too contended) is a 503 with
    its code and retry-after for the client, not a 500 (issue 9)."""
    stack = Stack(tmp_path)
    stack.start_nats()
    try:
        nc = await stack.bus()
        contended = ContentionError("The limit counters are too contended; retry shortly.", retry_after=2.0)

        async def refuse(msg: Msg) -> None:  # stands in for the scheduler
            await msg.respond(Admission(error=contended.to_wire()).encode())

        await nc.subscribe(subjects.SCHED_SUBMIT, cb=refuse)
        await stack.start_api()
        async with sdk(stack) as client:
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(model=ECHO, messages=USER)
    finally:
        await stack.close()
    assert e.value.status_code == 503
    assert e.value.body == {"message": contended.message, "type": "server_error", "param": None, "code": "contention"}
    assert e.value.response.headers["retry-after"] == "2"
