"""The cloud adapter's connections to its upstream: an httpx transport on aiohttp's client.

`CloudBackend` keeps speaking httpx (requests, streamed responses, httpx's errors); only the
wire underneath changes. httpx's own pool (httpcore on anyio, h11) walks every pooled connection
on each request and each release, with a readability poll per idle one: measured in
bench/RESULTS.md at 25 % of the cloud worker's samples at 32 at once, and enough at thousands of
open streams to stall its event loop past the gateway's silence limit. aiohttp's connector keeps
idle connections per host in a queue (no scan), parses with llhttp in C, and writes a request's
headers and body in one go.

What httpx would do is kept: certificates checked against certifi's CA bundle (httpx's default,
not the host's store, which a slim container may lack), no redirects followed, nothing taken
from the environment (proxies, .netrc), no cookies kept, the body left encoded (httpx decodes it
by its headers), the timeouts of each request (connect, read between chunks, waiting for a free
connection), and every transport failure raised as the httpx error it would have been, so
callers tell a timeout from a refused connection from a cut one as before.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import certifi
import httpx

# What a transport can fail with; anything else (a cancellation, a bug) passes through as it is.
_FAILURES = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
# Set by aiohttp itself (from the URL, the body and HTTP/1.1's keep-alive), so not copied over.
_OWN_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Up to `connections` open connections, kept alive `keepalive` seconds when idle. Its
    session is made on the first request (in the running loop) and closed by `aclose`."""

    def __init__(self, *, connections: int, keepalive: float = 60.0) -> None:
        self._connections = connections
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None

    def _need_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive,
                ttl_dns_cache=300,
                ssl=ssl.create_default_context(cafile=certifi.where()),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # httpx decodes by Content-Encoding, once
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._need_session()
        raw = request.headers.raw
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.lower() not in _OWN_HEADERS]
        body = await request.aread()
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=_timeout(request.extensions.get("timeout", {})),
            )
        except _FAILURES as e:
            raise _translated(e, request) from e
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode("latin-1")},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body(httpx.AsyncByteStream):
    """A response's body as aiohttp reads it; closing it before the end drops the connection
    (aiohttp cannot reuse one with unread body), after the end returns it to the pool."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except _FAILURES as e:
            raise _translated(e, self._request) from e

    async def aclose(self) -> None:
        self._response.release()


def _timeout(t: dict[str, Any]) -> aiohttp.ClientTimeout:
    """httpx's per-request timeouts in aiohttp's terms: `pool` is the wait for a free
    connection (aiohttp's `connect` covers that and the connect), `read` the longest silence."""
    connect, read, pool = t.get("connect"), t.get("read"), t.get("pool")
    whole_connect = None if connect is None and pool is None else (connect or 0.0) + (pool or 0.0)
    return aiohttp.ClientTimeout(total=None, connect=whole_connect, sock_connect=connect, sock_read=read)


def _translated(e: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx error this failure would have been."""
    message = f"{type(e).__name__}: {e}"
    if isinstance(e, aiohttp.ConnectionTimeoutError):  # connecting, or waiting for a free connection
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(e, aiohttp.ServerTimeoutError | asyncio.TimeoutError):  # sock_read: a silence too long
        return httpx.ReadTimeout(message, request=request)
    if isinstance(e, aiohttp.ClientConnectorError | aiohttp.InvalidUrlClientError):
        return httpx.ConnectError(message, request=request)
    if isinstance(e, aiohttp.ClientResponseError):  # an answer that is not HTTP
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)  # disconnected, reset, a truncated body
