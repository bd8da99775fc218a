"""A minimal HTTP server for a role that has no web app of its own (the ledger): `GET` of a few
fixed paths (`/metrics`, `/healthz`, `/readyz`), each answered by an async function, one
request per connection. Enough for Prometheus and for Kubernetes probes; anything else is a
404, and a request that does not arrive within a few seconds is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

READ_TIMEOUT = 5.0
MAX_HEAD = 8192
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Awaitable[Answer]]


class ProbeServer:
    def __init__(self, routes: dict[str, Route], *, host: str, port: int) -> None:
        self._routes = routes
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen, for port 0); 0 before `start`."""
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            answer = await self._answer(head[:MAX_HEAD])
            body = answer.body.encode()
            writer.write(
                f"HTTP/1.1 {answer.status} {REASONS.get(answer.status, '')}\r\nContent-Type: {answer.content_type}"
                f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a probe that went away or never spoke: nothing to answer
        except Exception:  # top of a handler: one bad probe must not stop the server
            log.exception("probe.failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> Answer:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) < 2:
            return Answer(404, "not found\n")
        method, path = parts[0], parts[1].split("?", 1)[0]
        route = self._routes.get(path)
        if route is None:
            return Answer(404, "not found\n")
        if method not in {"GET", "HEAD"}:
            return Answer(405, "method not allowed\n")
        return await route()
