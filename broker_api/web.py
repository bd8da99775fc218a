"""HTTP plumbing the gateway's routes share: OpenAI-shaped error responses for everything, a
request id on every response, a client that leaves, SSE framing and a stream that stops for a
client that stopped reading (a bounded JSON body is `broker_api.body`).

Every error a client can see leaves through `error_response`, as OpenAI's error object with
the right status: bad input is a 4xx, never a 422 or a 500, and never a dropped connection.

A stream is pulled event by event by the writes to its client (uvicorn's flow control makes a
write wait while the connection's buffer is full), so a client that stops reading stops the
answer at the gateway. `BoundedStream` gives each write `stall` seconds: past that, the job is
stopped and billed for what was written (`on_stall`), and the connection is aborted by its guard
(`broker_api.connection`) instead of holding the answer's events while the worker goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    TokenyardError,
)
from schemas.trace import request_id

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Seconds a stalled stream's last write still waits, after its job was stopped, for the
# connection's guard to abort the connection (or the client to read again), before it returns.
STALL_CLOSE = 5.0


def error_response(e: TokenyardError) -> JSONResponse:
    headers = {}
    if e.retry_after is not None:
        headers["retry-after"] = str(max(1, round(e.retry_after)))
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _tokenyard_error(request: Request, e: TokenyardError) -> Response:
    return error_response(e)


async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
    if e.status_code == 404:
        return error_response(NotFoundError(f"Invalid URL ({request.method} {request.url.path})"))
    if e.status_code == 405:
        return error_response(MethodNotAllowedError(f"Method not allowed: {request.method} {request.url.path}"))
    return JSONResponse(
        {"error": {"message": str(e.detail), "type": "invalid_request_error", "param": None, "code": None}},
        status_code=e.status_code,
    )


async def _validation_error(request: Request, e: RequestValidationError) -> Response:
    return error_response(InvalidRequestError(str(e.errors()[0].get("msg", "invalid request"))))


async def _unexpected(request: Request, e: Exception) -> Response:
    log.exception("api.unhandled", path=request.url.path)
    return error_response(TokenyardError("The server had an error while processing your request."))


def add_error_handlers(app: FastAPI) -> None:
    app.exception_handler(TokenyardError)(_tokenyard_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(Exception)(_unexpected)


class RequestIdMiddleware:
    """Gives every response an `x-request-id` (the client's own, when it sent a sane one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id(given)  # the client's when sane, else a new one (schemas.trace)
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def watch_disconnect(
    request: Request,
    work: Callable[[], Awaitable[T]],
    cleanup: Callable[[], Awaitable[None]],
    render: Callable[[T], Response],
) -> Response:
    """Run `work` in this task, cancelling it if the client disconnects first; `cleanup` runs
    either way."""
    this = asyncio.current_task()
    if this is None:
        raise RuntimeError("watch_disconnect runs inside a task")
    gone = working = False

    async def watch() -> None:
        nonlocal gone
        await _until_disconnect(request.receive)
        if working:  # never interrupt the cleanup below
            gone = True
            this.cancel()

    watcher = asyncio.ensure_future(watch())
    working = True
    try:
        return render(await work())
    except asyncio.CancelledError:
        if not gone:
            raise
        this.uncancel()
        return Response(status_code=499)
    finally:
        working = False
        watcher.cancel()
        await cleanup()


def data_frame(payload: str) -> bytes:
    """An SSE `data:` event (chat and legacy completions chunks, their `[DONE]`)."""
    return f"data: {payload}\n\n".encode()


def event_frame(kind: str, payload: str) -> bytes:
    """A named SSE event (`event:` and `data:`), as the Responses API sends them."""
    return f"event: {kind}\ndata: {payload}\n\n".encode()


async def sse(
    first: bytes, rest: AsyncGenerator[bytes, None], cleanup: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """SSE frames: `first` (already produced, so errors before it were HTTP errors), then `rest`."""
    try:
        yield first
        async for frame in rest:
            yield frame
    finally:
        await rest.aclose()
        await cleanup()


class BoundedStream(StreamingResponse):
    """An SSE response whose every write must leave within `stall` seconds (0: no bound); past
    that the client has stopped reading: `on_stall` ends the request (the job stopped, billed for
    what was written), and the connection is left to its guard to abort."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        stall: float,
        on_stall: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._stall = stall
        self._on_stall = on_stall

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            message: Message = {"type": "http.response.body", "body": chunk, "more_body": True}
            if self._stall <= 0:
                await send(message)
                continue
            try:
                async with asyncio.timeout(self._stall):
                    await send(message)
            except TimeoutError:
                log.warning("api.stream_stalled", stall=self._stall)
                await self._on_stall()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STALL_CLOSE):
                        await send(message)  # returns once the guard aborted the connection
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
