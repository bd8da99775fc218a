"""Slow and oversized requests on real connections (issue 11, case 11a): clients that trickle
their headers or a body are cut off at the deadlines, huge headers get a 431, and the gateway
keeps serving everyone else meanwhile."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlparse

import httpx

from broker_api.connection import BODY_GRACE
from tests.helpers import ECHO
from tests.stack import ADMIN_KEY, Stack, auth_headers

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
TRICKLE_EVERY = 0.2
HOLD_FOR = 12.0  # a trickler gives up after this long (the test would fail then)
MARGIN = 2.5  # the machine is loaded


async def _trickle(url: str, head: bytes, slow: bytes) -> tuple[float, bytes]:
    """Send `head` at once, then `slow` a byte every TRICKLE_EVERY seconds, until the server
    closes the connection. Returns (seconds until it did, what it answered)."""
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    started = time.monotonic()
    answer = asyncio.create_task(reader.read())  # everything until EOF
    try:
        writer.write(head)
        for i in range(int(HOLD_FOR / TRICKLE_EVERY)):
            if answer.done():
                break
            writer.write(slow[i % len(slow) : i % len(slow) + 1])
            await writer.drain()
            await asyncio.sleep(TRICKLE_EVERY)
        got = await asyncio.wait_for(asyncio.shield(answer), 1.0)
    except (ConnectionError, TimeoutError):  # reset, or still open when the trickler gave up
        got = b""
    finally:
        answer.cancel()
        writer.close()
    return time.monotonic() - started, got


def _status_and_error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body[: body.rfind(b"}") + 1] or b"{}")


async def test_slow_headers_and_bodies_are_cut_off_and_normal_requests_are_unaffected(stack: Stack) -> None:
    stack.start_worker()
    url = await stack.start_api(header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT)
    await stack.wait_for_model(ECHO)
    auth = f"authorization: Bearer {ADMIN_KEY}\r\n".encode()
    heads = [
        asyncio.create_task(_trickle(url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n", b"x-slow: abc\r\n"))
        for _ in range(100)
    ]
    chat_bodies = [
        asyncio.create_task(
            _trickle(
                url,
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + auth + b"content-type: application/json\r\n"
                b"content-length: 1000\r\n\r\n",
                b'{"model": "x"',
            )
        )
        for _ in range(50)
    ]
    unread = [
        asyncio.create_task(_trickle(url, b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n", b"x"))
        for _ in range(30)
    ]

    # Meanwhile, ordinary clients are served as usual.
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=10) as http:
        good = {"model": ECHO, "messages": [{"role": "user", "content": "still here"}], "max_tokens": 2}
        for _ in range(20):
            r = await http.post("/v1/chat/completions", json=good)
            assert r.status_code == 200, r.text
            assert (await http.get("/healthz")).status_code == 200
            await asyncio.sleep(0.1)
        many = {f"x-many-{i}": "v" * 40 for i in range(200)}  # 10 KB of headers: fine
        assert (await http.get("/healthz", headers=many)).status_code == 200
        r = await http.get("/healthz", headers={"x-huge": "h" * 100_000})
        assert r.status_code == 431
        assert r.json()["error"]["code"] == "request_header_fields_too_large"

    for took, answer in await asyncio.gather(*heads):
        assert took <= HEADER_TIMEOUT + MARGIN, f"slow headers held {took:.1f} s"
        status, body = _status_and_error(answer)
        assert status == 408 and body["error"]["code"] == "request_timeout"  # type: ignore[index]
    for took, answer in await asyncio.gather(*chat_bodies):
        assert took <= BODY_TIMEOUT + BODY_GRACE + MARGIN, f"a slow body held {took:.1f} s"
        status, body = _status_and_error(answer)
        assert status == 408 and body["error"]["code"] == "request_timeout"  # type: ignore[index]
    for took, answer in await asyncio.gather(*unread):
        assert took <= BODY_TIMEOUT + BODY_GRACE + MARGIN, f"an unread body held {took:.1f} s"
        assert answer.startswith(b"HTTP/1.1 200")
