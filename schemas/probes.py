"""The probe endpoint of a role without an HTTP API (scheduler, worker, ledger): `/metrics`,
`/healthz` and `/readyz` on `--metrics-host`:`--metrics-port`.

A tiny asyncio HTTP/1.0 server, stdlib only: it knows nothing of Prometheus. Each role hands it
two coroutines, `metrics()` (the exposition bytes and their content type, rendered from the
role's own registry) and `ready()`; so every role serves its probes the same way and this
module stays pure. `/healthz` answers 200 while the process's event loop runs; `/readyz` 200
or 503 as `ready()` says. One request per connection, bounded in size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

READ_TIMEOUT = 5.0
MAX_REQUEST_LINE = 4096

Render = Callable[[], Awaitable[tuple[bytes, str]]]
Ready = Callable[[], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class ProbeServer:
    """A started server; `port` is the one it listens on (useful with port 0: any free one)."""

    server: asyncio.AbstractServer
    port: int

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


async def serve_probes(host: str, port: int, *, metrics: Render, ready: Ready, role: str) -> ProbeServer | None:
    """Start serving; None when `port` is 0 (disabled) or cannot be bound. A port in use is
    logged with the fix, and the role serves on without metrics: an observability port must
    not take capacity down (a readiness probe on it shows the problem)."""
    if port <= 0:
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _answer(reader, writer, metrics, ready)
        except Exception:  # top of a connection handler: log, close, keep serving
            log.exception("probes.request_failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_LINE * 2)
    except OSError as e:
        log.error(
            "probes.unavailable",
            host=host,
            port=port,
            error=e.strerror or str(e),
            fix=f"pass another --metrics-port (or 0 to turn metrics off) to this {role}",
        )
        return None
    bound = int(server.sockets[0].getsockname()[1])
    log.info("probes.listening", host=host, port=bound)
    return ProbeServer(server, bound)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, metrics: Render, ready: Ready) -> None:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing here needs them
    except (TimeoutError, ValueError, ConnectionError):
        return
    parts = line.decode("latin-1").split()
    method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
    if method not in ("GET", "HEAD"):
        status, body, ctype = "405 Method Not Allowed", b"method not allowed\n", "text/plain"
    elif path == "/metrics":
        body, ctype = await metrics()
        status = "200 OK"
    elif path == "/healthz":
        status, body, ctype = "200 OK", b'{"status":"ok"}', "application/json"
    elif path == "/readyz":
        ok = await ready()
        status = "200 OK" if ok else "503 Service Unavailable"
        body, ctype = (b'{"status":"ready"}' if ok else b'{"status":"not ready"}'), "application/json"
    else:
        status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
    head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
    await writer.drain()
