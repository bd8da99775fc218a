"""The gateway's HTTP edge for operators: one log line and one count per request, and the
request's ids bound to every log line written while it is served.

`ObserveMiddleware` sits inside `RequestIdMiddleware` (which picked the request id). For each
HTTP request it

- binds `request_id` (structlog context variables) and puts the request's W3C `traceparent`
  (the client's trace continued, or a new one: `schemas.trace`) in `scope["state"]`, where the
  chat route reads both into the job envelope; with OpenTelemetry on (`schemas.otel`) that is
  the traceparent of this request's `api.request` span;
- counts it (`tokenyard_api_http_requests_total`; a chat completion also in
  `tokenyard_api_requests_total` with its model, route and outcome, refusals included);
- logs `request.done` at info (status, outcome, duration, tokens; never the prompt or the key);
  probes (`/healthz`, `/readyz`, `/metrics`) at debug.

What only the chat service knows (the model, the pool that served, the tokens, a record's
outcome) it leaves on the request's `broker_api.metrics.Meter` through `Metrics.opened` and
`Metrics.finished`: a context variable finds it, as the service runs in this request's context
(its streaming body and its settling task copy it).
"""

from __future__ import annotations

import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker_api.metrics import METER, MODEL_STATUSES, Meter, Metrics
from schemas.otel import Tracing

log = structlog.get_logger(__name__)

CHAT_PATH = "/v1/chat/completions"
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
STREAM_ERROR = b'data: {"error":'  # an SSE error event, as `broker_api.chat_shape` writes it


def _outcome(status: int, meter: Meter, *, cached: bool, replayed: bool, stream_error: bool, gone: bool) -> str:
    if replayed:
        return "replayed"
    if meter.recorded and meter.outcome:
        return meter.outcome
    if gone or status == 499:
        return "cancelled"
    if status < 400:
        return "error" if stream_error else ("cached" if cached else "ok")
    if status in (429, 503):
        return "refused"
    return "error" if status >= 500 else "invalid"


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, tracing: Tracing) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        state = scope.setdefault("state", {})
        parent = dict(scope["headers"]).get(b"traceparent", b"").decode("latin-1")
        path: str = scope["path"]
        chat = path == CHAT_PATH
        meter = Meter()
        token = METER.set(meter)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=state.get("request_id", ""))
        status, cached, replayed, stream_error, gone = 500, "", False, False, False

        async def watched_receive() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal status, cached, replayed, stream_error
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name == b"x-tokenyard-cache":
                        cached = value.decode("latin-1")
                    elif name == b"idempotent-replayed":
                        replayed = True
            elif chat and message["type"] == "http.response.body" and status < 400:
                if message.get("body", b"").startswith(STREAM_ERROR):
                    stream_error = True
            await send(message)

        if chat:
            self.metrics.inflight.inc()
        with self.tracing.span("api.request", parent, **{"http.method": scope["method"], "http.target": path}) as hop:
            state["traceparent"] = hop.traceparent
            try:
                await self.app(scope, watched_receive if chat else receive, watched_send)
            finally:
                if chat:
                    self.metrics.inflight.dec()
                METER.reset(token)
                self._done(scope, meter, status, cached, replayed, stream_error, gone, time.monotonic() - started)
                hop.annotate(**{"http.status_code": status, "tokenyard.request_id": state.get("request_id", "")})

    def _done(
        self,
        scope: Scope,
        meter: Meter,
        status: int,
        cached: str,
        replayed: bool,
        stream_error: bool,
        gone: bool,
        seconds: float,
    ) -> None:
        route = scope.get("route")
        # (a plain Starlette route, as the chat route is, does not leave itself in the scope)
        handler = str(getattr(route, "path", "")) or (CHAT_PATH if scope["path"] == CHAT_PATH else "unmatched")
        method = str(scope.get("method", ""))
        self.metrics.http.labels(handler, method, str(status)).inc()
        path = scope["path"]
        if path != CHAT_PATH:
            (log.debug if path in PROBES else log.info)(
                "request.done", method=method, path=handler, status=status, duration_ms=round(seconds * 1e3, 3)
            )
            return
        outcome = _outcome(
            status, meter, cached=cached == "hit", replayed=replayed, stream_error=stream_error, gone=gone
        )
        final = meter.status if meter.recorded and meter.status else status
        self.metrics.ended(model=meter.model, route=meter.route, status=final, outcome=outcome)
        if cached and not replayed:
            self.metrics.cache.labels(cached).inc()
        log.info(
            "request.done",
            method=method,
            path=handler,
            status=final,
            outcome=outcome,
            model=meter.model if final in MODEL_STATUSES else "",
            route=meter.route,
            duration_ms=round(seconds * 1e3, 3),
            prompt_tokens=meter.prompt_tokens,
            completion_tokens=meter.completion_tokens,
        )
