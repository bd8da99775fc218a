"""The cloud adapter's transport (worker/upstream_http.py) against real servers on 127.0.0.1:
it answers as httpx would, streams, fails with httpx's errors, and checks certificates."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator

import httpx
import pytest
import trustme
from aiohttp import web

from worker.upstream_http import AiohttpTransport


async def _chunks(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for i in range(3):
        await response.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def _silent(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(text="too late")


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"body": (await request.read()).decode(), "auth": request.headers.get("authorization")})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, trustme.CA]]:
    """One app served twice: plain HTTP, and HTTPS with a certificate from a CA nobody trusts."""
    app = web.Application()
    app.router.add_post("/echo", _echo)
    app.router.add_get("/chunks", _chunks)
    app.router.add_get("/silent", _silent)
    runner = web.AppRunner(app)
    await runner.setup()
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    plain, secure = _listening(), _listening()
    await web.SockSite(runner, plain).start()
    await web.SockSite(runner, secure, ssl_context=context).start()
    yield f"http://127.0.0.1:{plain.getsockname()[1]}|https://127.0.0.1:{secure.getsockname()[1]}", ca
    await runner.cleanup()


def _listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _client(timeout: float = 2.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AiohttpTransport(connections=4), timeout=timeout)


async def test_answers_and_streams_as_httpx(server: tuple[str, trustme.CA]) -> None:
    plain = server[0].split("|")[0]
    async with _client() as client:
        r = await client.post(f"{plain}/echo", content=b'{"a": 1}', headers={"authorization": "Bearer k"})
        assert r.status_code == 200 and r.json() == {"body": '{"a": 1}', "auth": "Bearer k"}
        async with client.stream("GET", f"{plain}/chunks") as streamed:
            lines = [line async for line in streamed.aiter_lines() if line]
        assert lines == ["data: 0", "data: 1", "data: 2"]
        again = await client.post(f"{plain}/echo", content=b"x")  # the connection went back to the pool
        assert again.json()["body"] == "x"


async def test_failures_are_httpx_errors(server: tuple[str, trustme.CA]) -> None:
    plain = server[0].split("|")[0]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    async with _client(timeout=0.3) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{closed}/")
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{plain}/silent")


async def test_certificates_are_checked(server: tuple[str, trustme.CA]) -> None:
    """An upstream whose certificate no trusted CA signed is refused, as httpx refuses it."""
    secure = server[0].split("|")[1]
    async with _client() as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await client.get(f"{secure}/chunks")
    async with httpx.AsyncClient(timeout=2.0) as plain_httpx:  # the same refusal, from httpx's own transport
        with pytest.raises(httpx.ConnectError):
            await plain_httpx.get(f"{secure}/chunks")
