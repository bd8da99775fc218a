"""broker_api.connection.Framing: following HTTP/1.1 request framing byte by byte (pure)."""

from __future__ import annotations

import pytest

from broker_api.connection import Framing, error_response
from schemas.errors import HeadersTooLargeError

GET = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
CHUNKED = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
)


def _phases(data: bytes, step: int) -> tuple[list[str], Framing]:
    f, out = Framing(), []
    for i in range(0, len(data), step):
        f.feed(data[i : i + step])
        out.append(f.phase)
    return out, f


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_requests_in_any_slicing_end_idle_with_their_heads_counted(step: int) -> None:
    stream = GET + POST + b"\r\n" + CHUNKED + GET
    phases, f = _phases(stream, step)
    assert f.phase == "idle" and f.heads == 4
    if step == 1:
        assert "head" in phases and "body" in phases


def test_phase_follows_a_request_through_head_and_body() -> None:
    f = Framing()
    f.feed(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n")
    assert (f.phase, f.heads) == ("head", 1)
    f.feed(b"\r\nab")
    assert f.phase == "body"
    f.feed(b"c")
    assert f.phase == "idle"
    f.feed(b"G")
    assert (f.phase, f.heads) == ("head", 2)


def test_a_head_over_the_limit_is_too_large_whether_or_not_it_ends() -> None:
    f = Framing(max_head=100)
    f.feed(b"GET / HTTP/1.1\r\n" + b"x-a: " + b"a" * 200)
    assert f.phase == "too_large"
    f = Framing(max_head=100)
    f.feed(b"GET / HTTP/1.1\r\n" + b"x-a: " + b"a" * 200 + b"\r\n\r\n")
    assert f.phase == "too_large"
    f = Framing(max_head=100)
    f.feed(b"GET / HTTP/1.1\r\nx-a: b\r\n\r\n" + b"x" * 50)  # the next head has begun, within the limit
    assert f.phase == "head" and f.heads == 2


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\ncontent-length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_framing_it_cannot_follow_is_lost(head: bytes) -> None:
    f = Framing()
    f.feed(head)
    assert f.phase == "lost"


def test_the_error_response_is_a_whole_http_response_with_the_error_object() -> None:
    raw = error_response(HeadersTooLargeError("too big"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head
    assert f"content-length: {len(body)}".encode() in head
    assert body.startswith(b'{"error":{"message":"too big"')
