"""Bad input that used to get HTTP 500 (issue 11, case 3): integers beyond 64 bits, lone
surrogates, deep nesting, a message over NATS's payload limit. Each is a clear 400 or 413 in
OpenAI's error object, on the chat route and the admin routes, and the keep-alive connection
that carried it serves the next request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import ECHO
from tests.stack import Stack, auth_headers

USER = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
async def one_connection(echo_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client with a single keep-alive connection: every request goes over the same socket."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=echo_stack.api_url, headers=auth_headers(), timeout=30, limits=limits) as c:
        yield c


def _raw(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _local_port(r: httpx.Response) -> int:
    return int(r.extensions["network_stream"].get_extra_info("socket").getsockname()[1])


BAD = [
    # (raw JSON body, status, param)
    (
        '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551617}' % ECHO,
        400,
        "seed",
    ),
    (
        '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x_extra": -9223372036854775809}' % ECHO,
        400,
        "x_extra",
    ),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "n": %s}' % (ECHO, "9" * 5000), 400, "n"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % ECHO, 400, "messages[0].content"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi", "\\udc00k": 1}]}' % ECHO, 400, "messages[0]"),
    (
        '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "meta": {"a": ["\\udfff"]}}' % ECHO,
        400,
        "meta.a[0]",
    ),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}' % ECHO, 400, "temperature"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}' % ECHO, 400, "top_p"),
    ('{"model": "%s", "messages": %s}' % (ECHO, "[" * 1000 + "]" * 1000), 400, None),
    (
        '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": %s}' % (ECHO, "[" * 100 + "]" * 100),
        400,
        None,
    ),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
async def test_bad_json_values_are_400_and_the_connection_lives_on(
    one_connection: httpx.AsyncClient, body: str, status: int, param: str | None
) -> None:
    bad = await one_connection.post(CHAT, **_raw(body))
    err = _error(bad, status)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    good = await one_connection.post(CHAT, json={"model": ECHO, "messages": USER, "max_tokens": 2})
    assert good.status_code == 200, good.text
    assert _local_port(good) == _local_port(bad)  # the same keep-alive connection


async def test_invalid_utf8_is_400(one_connection: httpx.AsyncClient) -> None:
    raw = b'{"model": "' + ECHO.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    err = _error(await one_connection.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and "UTF-8" in err["message"]


async def test_a_message_over_the_nats_payload_limit_is_413_before_anything_is_queued(
    one_connection: httpx.AsyncClient, echo_stack: Stack
) -> None:
    """1.1 MB of content: under the 4 MiB body limit, over NATS's 1 MiB max_payload."""
    huge = {"model": ECHO, "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    err = _error(await one_connection.post(CHAT, json=huge), 413)
    assert "1048576" in err["message"] and err["param"] == "messages"
    good = await one_connection.post(CHAT, json={"model": ECHO, "messages": USER, "max_tokens": 2})
    assert good.status_code == 200, good.text
    js = (await echo_stack.bus()).jetstream()
    for stream in ("TY_WORK", "TY_INTAKE"):
        info = await js.stream_info(stream)
        assert info.state.bytes < 1_000_000  # nothing of it was queued


async def test_a_body_over_the_limit_is_413_on_a_connection_that_lives_on(one_connection: httpx.AsyncClient) -> None:
    bad = await one_connection.post(CHAT, content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    _error(bad, 413)
    good = await one_connection.post(CHAT, json={"model": ECHO, "messages": USER, "max_tokens": 2})
    assert good.status_code == 200, good.text


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "o", "limits": {"rpm": 18446744073709551617}}',
        '{"name": "\\ud800"}',
        '{"name": "o", "projects": %s}' % ("[" * 1000 + "]" * 1000),
        '{"name": "o", "limits": {"usd_per_day": Infinity}}',
        '{"name": "o"',
    ],
    ids=["huge-int", "surrogate", "deep", "infinity", "truncated"],
)
async def test_the_admin_routes_read_bodies_the_same_way(one_connection: httpx.AsyncClient, body: str) -> None:
    for path in ("/v1/admin/orgs", "/v1/admin/keys", "/v1/admin/routing/default"):
        method = "PUT" if "routing" in path else "POST"
        bad = await one_connection.request(method, path, **_raw(body))
        _error(bad, 400)
    good = await one_connection.get("/v1/admin/orgs")
    assert good.status_code == 200, good.text
    assert _local_port(good) == _local_port(bad)
