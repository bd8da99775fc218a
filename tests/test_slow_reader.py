"""Issue 11, case 5: a client that stops reading. A real socket client with a small receive
buffer reads 2 KB of a 4,000-token stream and then holds the connection without reading. The
gateway must not buffer the rest: past `--stream-stall-timeout` its job is stopped on the
worker, the stream closed, and the request billed for what was written, not what was produced;
the gateway's memory does not grow with the unread answer."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx

from tests.helpers import ECHO, watch_adverts
from tests.stack import ADMIN_KEY, Stack, auth_headers

STALL = 2.0
TOKENS = 4000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stuck_reader(port: int, body: bytes, *, read: int) -> socket.socket:
    """A connection that sends the request, reads `read` bytes, then reads nothing more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    got = b""
    while len(got) < read:
        chunk = sock.recv(read - len(got))
        if not chunk:
            break
        got += chunk
    assert b" 200 " in got.split(b"\r\n", 1)[0], got[:200]
    return sock


async def test_a_reader_that_stops_reading_is_cut_and_billed_for_what_was_written(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="2")
    # a data dir of its own: its ledger holds this test's rows only
    api, url = await stack.spawn_api(
        TOKENYARD_STREAM_STALL_TIMEOUT=str(STALL), TOKENYARD_DATA_DIR=str(stack.tmp / "gw")
    )
    stack.api_url = url
    await stack.wait_for_model(ECHO)
    adverts = await watch_adverts(stack)
    words = " ".join(f"word{i:04d}" for i in range(20))
    body = json.dumps(
        {
            "model": ECHO,
            "messages": [{"role": "user", "content": f"{words} [[tokens={TOKENS}]] [[rate=400]]"}],
            "stream": True,
        }
    ).encode()
    before = rss_kib(api.pid)
    sock = await asyncio.to_thread(stuck_reader, int(url.rsplit(":", 1)[1]), body, read=2048)
    try:
        started = time.monotonic()
        assert await adverts.wait(lambda a: any(n.slots_free < 2 for n in a.values()), 3.0)
        # the answer would take 10 s; the job is stopped once the reader has been stuck STALL s
        assert await adverts.wait(lambda a: a and all(n.slots_free == 2 for n in a.values()), STALL + 4.0)
        stopped = time.monotonic() - started
        grown = rss_kib(api.pid) - before
    finally:
        sock.close()
    assert stopped < STALL + 4.0
    assert grown < 8 * 1024, f"the gateway grew {grown} KiB"
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=30) as http:
        deadline = time.monotonic() + 15
        rows: list[dict[str, object]] = []
        while not rows and time.monotonic() < deadline:
            rows = (await http.get("/v1/admin/usage/export", params={"format": "json"})).json()["data"]
            await asyncio.sleep(0.2)
    [row] = rows
    # what was written went into a few socket buffers: far from the 4,000 tokens produced at most
    assert 0 < int(row["completion_tokens"]) < 2000, row  # type: ignore[call-overload]
    assert row["outcome"] == "cancelled" and row["counted_by"] == "estimate", row
