"""The FastAPI application: OpenAI routes, health, and OpenAI-shaped errors for everything.

Route handlers stay thin: authenticate, read and validate the body, hand over to
`ChatService`, shape the HTTP response. Every error a client can see leaves through
`_error_response`, as OpenAI's error object with the right status: bad input is a 4xx, never
a 422 or a 500, and never a dropped connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker_api import admin_keys, unavailable
from broker_api.accounting import Accounts
from broker_api.admin import Admin, admin_router
from broker_api.admin_console import router as admin_console_router
from broker_api.audit import Auditor
from broker_api.auth import KeyStore, Principal
from broker_api.body import read_json
from broker_api.bus import Bus
from broker_api.cache import ResponseCache
from broker_api.chat import ChatService
from broker_api.console import SessionMiddleware
from broker_api.console import router as console_router
from broker_api.deps import Services
from broker_api.directory import Directory
from broker_api.fleetwatch import FleetWatch
from broker_api.idempotency import Idempotency
from broker_api.ledger import Ledger, LedgerFeed, LedgerReader
from broker_api.ledger_query import LedgerClient
from broker_api.metrics import Metrics, consumer_lag
from broker_api.nodes import NodeServices
from broker_api.nodes import router as nodes_router
from broker_api.observe import ObserveMiddleware
from broker_api.sessions import SessionStore, signed_in
from broker_api.settings import ApiSettings
from broker_api.unavailable import NATS_ERRORS
from schemas import streams
from schemas.chat import ModelCard, ModelList, parse_chat_request
from schemas.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    TokenyardError,
)
from schemas.jetstream import ensure, open_bucket
from schemas.otel import Tracing
from schemas.rules import check_max_tokens
from schemas.settings import replicas_setting
from schemas.trace import request_id

log = structlog.get_logger(__name__)

STARTED = int(time.time())
CACHE_HEADER = "x-tokenyard-cache"
# OpenRouter's fields beyond OpenAI's that the gateway honours (routing, cost): not "unknown".
HONOURED_EXTRAS = frozenset({"provider", "models", "usage", "transforms"})


def _error_response(e: TokenyardError, request_id: str | None = None) -> JSONResponse:
    headers = {}
    if e.retry_after is not None:
        headers["retry-after"] = str(max(1, round(e.retry_after)))
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


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


async def _read_json(request: Request, limit: int) -> Any:
    return await read_json(request, limit=limit, timeout=request.app.state.services.settings.body_timeout)


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def create_app(settings: ApiSettings, *, admin_key: str, bus: Bus | None = None) -> FastAPI:
    """The gateway app. With `bus` None it connects to `settings.nats_url` in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = bus is None
        the_bus = await Bus.connect(settings.nats) if own else bus
        assert the_bus is not None
        the_bus.lanes.enabled = settings.lanes
        nc, js = the_bus.nc, the_bus.nc.jetstream()
        replicas = replicas_setting(settings.replicas)
        directory = await Directory.open(nc, js, pepper=settings.pepper.encode(), replicas=replicas)
        keys.directory = directory
        for spec in (streams.USAGE, streams.AUDIT):
            await ensure(nc, spec, replicas=replicas)
        accounts = Accounts(js)
        cache = (
            await ResponseCache.open(
                nc, js, ttl=settings.cache_ttl, max_bytes=settings.cache_max_bytes, replicas=replicas
            )
            if settings.cache
            else None
        )
        ledger = await Ledger.open(Path(settings.data_dir) / "ledger.sqlite") if settings.ledger else None
        feed = LedgerFeed(js, ledger, name=settings.ledger_name) if ledger is not None else None
        fleet = FleetWatch(the_bus.nc, accounts.audit)  # also the node registry's live view
        reports: LedgerReader = ledger if ledger is not None else LedgerClient(nc)  # else: the ledger role
        for part in (feed, fleet):
            if part is not None:
                await part.start()
        app.state.bus = the_bus
        app.state.ledger_feed = feed
        idempotency = await Idempotency.open(nc, js, replicas=replicas)
        app.state.nodes = await NodeServices.open(
            nc, settings, fleet=fleet, auditor=Auditor(accounts.audit), ledger=reports, replicas=replicas
        )
        app.state.chat = ChatService(
            the_bus,
            settings,
            accounts=accounts,
            cache=cache,
            idempotency=idempotency,
            price_of=app.state.nodes.price_of,
        )
        app.state.chat.metrics = metrics
        routing_kv = await open_bucket(nc, js, streams.ROUTING, replicas=replicas)
        app.state.admin = Admin(directory, reports, accounts.audit, routing_kv)
        app.state.services = Services(
            settings=settings,
            bus=the_bus,
            keys=keys,
            directory=directory,
            chat=app.state.chat,
            auditor=Auditor(accounts.audit),
            routing=routing_kv,
            ledger=reports,
            metrics=metrics,
            sessions=await SessionStore.open(
                nc, js, keys, idle=settings.console_idle, lifetime=settings.console_lifetime, replicas=replicas
            ),
        )
        log.info("api.started", gateway=the_bus.gateway_id)
        try:
            yield
        finally:
            await app.state.chat.drain()  # cancelled requests waiting for their worker's count
            await app.state.nodes.close()
            for part in (fleet, feed):
                if part is not None:
                    await part.stop()
            await accounts.flush()
            if ledger is not None:
                await ledger.close()
            await directory.close()
            if own:
                await the_bus.close()
            tracing.close()

    keys = KeyStore(admin_key)
    metrics = Metrics()
    tracing = Tracing.start(settings.otlp_endpoint, role="api")
    app = FastAPI(title="Tokenyard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware)
    # inside RequestIdMiddleware: it reads the id
    app.add_middleware(ObserveMiddleware, metrics=metrics, tracing=tracing)
    app.add_middleware(RequestIdMiddleware)

    def authenticate(request: Request) -> Principal:
        return signed_in(request) or keys.authenticate(request.headers.get("authorization"))

    @app.exception_handler(TokenyardError)
    async def _tokenyard_error(request: Request, e: TokenyardError) -> JSONResponse:
        return _error_response(e)

    for kind in NATS_ERRORS:  # NATS's own exceptions: a 503 with Retry-After, never a 500
        app.add_exception_handler(kind, unavailable.handle)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return _error_response(NotFoundError(f"Invalid URL ({request.method} {request.url.path})"))
        if e.status_code == 405:
            return _error_response(MethodNotAllowedError(f"Method not allowed: {request.method} {request.url.path}"))
        return JSONResponse(
            {"error": {"message": str(e.detail), "type": "invalid_request_error", "param": None, "code": None}},
            status_code=e.status_code,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(InvalidRequestError(str(e.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("api.unhandled", path=request.url.path)
        return _error_response(TokenyardError("The server had an error while processing your request."))

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        bus, feed = request.app.state.bus, request.app.state.ledger_feed
        js = bus.nc.jetstream()
        lag = (lambda: consumer_lag(js, feed.durables)) if feed is not None else None
        body, content_type = await metrics.render(js, lanes=bus.lanes.placed, ledger_lag=lag)
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        ready = await request.app.state.bus.ready()
        return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        authenticate(request)
        models = await request.app.state.bus.models()
        body = ModelList(data=[ModelCard(id=m.id, created=STARTED, owned_by=m.owned_by) for m in models])
        return Response(body.model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        authenticate(request)
        for m in await request.app.state.bus.models():
            if m.id == model_id:
                card = ModelCard(id=m.id, created=STARTED, owned_by=m.owned_by)
                return Response(card.model_dump_json(), media_type="application/json")
        raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")

    async def chat_completions(request: Request) -> Response:
        who = authenticate(request)
        limit = who.key_limits.max_body_bytes or settings.max_body_bytes
        req = parse_chat_request(await _read_json(request, min(limit, settings.max_body_bytes)))
        unknown = sorted(set(req.model_extra or ()) - HONOURED_EXTRAS)
        if unknown:
            log.info("api.unknown_fields", fields=unknown)
        who.check_model(req.model)
        check_max_tokens(
            req.model_dump(include={"max_tokens", "max_completion_tokens"}), who.key_limits, who.org_limits
        )
        chat: ChatService = request.app.state.chat
        use_cache = request.headers.get(CACHE_HEADER, "").lower() not in {"no", "bypass", "off"}
        session = chat.open(
            req,
            who,
            use_cache=use_cache,
            idempotency_key=request.headers.get("idempotency-key", ""),
            request_id=request.state.request_id,
            traceparent=request.state.traceparent,
        )
        await chat.start(session)
        if session.replayed:
            headers = {"idempotent-replayed": "true"}
        else:
            headers = {CACHE_HEADER: "hit" if session.cached else ("miss" if session.cache_key else "bypass")}
        if not req.stream:
            return await _watch_disconnect(
                request,
                lambda: chat.complete(session),
                lambda: chat.finish(session, "client gone"),
                lambda result: Response(result.model_dump_json(), media_type="application/json", headers=headers),
            )
        payloads = chat.stream(session)
        try:
            first = await payloads.__anext__()
        except BaseException:
            await chat.finish(session, "failed")
            raise
        return StreamingResponse(
            _sse(first, payloads, lambda: chat.finish(session, "stream closed")),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
        )

    # A plain Starlette route: the hot path skips FastAPI's dependency machinery, which this
    # handler does not use (it reads and validates the body itself).
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.include_router(admin_router(authenticate))
    app.include_router(admin_console_router)
    app.include_router(console_router)
    app.include_router(nodes_router)
    app.include_router(admin_keys.router)

    return app


async def _watch_disconnect(
    request: Request,
    work: Callable[[], Awaitable[Any]],
    cleanup: Callable[[], Awaitable[None]],
    render: Callable[[Any], Response],
) -> Response:
    """Run `work` in this task, cancelling it if the client disconnects first; `cleanup` runs
    either way."""
    this = asyncio.current_task()
    assert this is not None
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


async def _sse(first: str, rest: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    try:
        yield f"data: {first}\n\n".encode()
        async for payload in rest:
            yield f"data: {payload}\n\n".encode()
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
        await cleanup()
