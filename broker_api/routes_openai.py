"""OpenAI's routes: `POST /v1/chat/completions` and `GET /v1/models[/{id}]`.

Thin: authenticate, read and validate the body, translate it (`broker_api.chat_shape`), hand
the session to `broker_api.serving`, and send the answer as JSON or as an SSE stream. The chat
route is a plain Starlette route: the hot path skips FastAPI's dependency machinery (it reads
and validates the body itself) and takes its collaborators from `deps.services(request)`.
"""

from __future__ import annotations

import time
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from broker_api import chat_shape
from broker_api.auth import Principal
from broker_api.body import read_json
from broker_api.deps import Services, caller, services
from broker_api.serving import STALLED, Serving
from broker_api.session import Session
from broker_api.sessions import signed_in
from broker_api.web import BoundedStream, sse, watch_disconnect
from schemas.chat import ChatCompletion, ModelCard, ModelList, parse_chat_request
from schemas.errors import ModelNotFoundError
from schemas.rules import check_max_tokens

log = structlog.get_logger(__name__)

STARTED = int(time.time())  # what /v1/models reports as every model's `created`
CACHE_HEADER = "x-tokenyard-cache"
ROUTE_HEADER = "x-tokenyard-route"
NO_CACHE = frozenset({"no", "bypass", "off"})
# OpenRouter's fields beyond OpenAI's that the gateway honours (routing, cost): not "unknown".
HONOURED_EXTRAS = frozenset({"provider", "models", "usage", "transforms"})

router = APIRouter()


async def chat_completions(request: Request) -> Response:
    s = services(request)
    who = signed_in(request) or s.keys.authenticate(request.headers.get("authorization"))  # a console session, or a key
    limit = min(who.key_limits.max_body_bytes or s.settings.max_body_bytes, s.settings.max_body_bytes)
    req = parse_chat_request(await read_json(request, limit=limit, timeout=s.settings.body_timeout))
    unknown = sorted(set(req.model_extra or ()) - HONOURED_EXTRAS)
    if unknown:
        log.info("api.unknown_fields", fields=unknown)
    who.check_model(req.model)
    check_max_tokens(req.model_dump(include={"max_tokens", "max_completion_tokens"}), who.key_limits, who.org_limits)
    serving = s.serving
    session = serving.open(
        chat_shape.ask(req),
        who,
        use_cache=request.headers.get(CACHE_HEADER, "").lower() not in NO_CACHE,
        idempotency_key=request.headers.get("idempotency-key", ""),
        request_id=request.state.request_id,
        traceparent=request.state.traceparent,
    )
    try:
        await serving.start(session)
    except BaseException:
        await serving.finish(session, "not admitted")
        raise
    if session.state == "replayed":
        headers = {"idempotent-replayed": "true"}
    else:
        headers = {CACHE_HEADER: "hit" if session.cached else ("miss" if session.cache_key else "bypass")}

    if not req.stream:

        async def answer() -> ChatCompletion:
            results = await serving.results(session)
            return chat_shape.completion(
                req, session, results, serving.charge(session), served=serving.served_by(session)
            )

        return await watch_disconnect(
            request,
            answer,
            lambda: serving.finish(session, "client gone"),
            lambda body: Response(
                body.model_dump_json(), media_type="application/json", headers=route_header(serving, session, headers)
            ),
        )
    payloads = chat_shape.payloads(serving, session, req)
    try:
        first = await payloads.__anext__()
    except BaseException:
        await serving.finish(session, "failed")
        raise
    return BoundedStream(
        sse(first, payloads, lambda: serving.finish(session, "stream closed")),
        stall=s.settings.stream_stall_timeout,
        on_stall=lambda: serving.finish(session, STALLED),
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **route_header(serving, session, headers)},
    )


def route_header(serving: Serving, session: Session, headers: dict[str, str]) -> dict[str, str]:
    """The response's headers and `x-tokenyard-route`, the route that answered (`cache` for a
    cache hit), once it is known (after the answer, or a stream's first chunk)."""
    _, route = serving.served_by(session)
    return {**headers, ROUTE_HEADER: "cache" if session.state == "cached" else route or "unknown"}


router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])


@router.get("/v1/models")
async def list_models(
    who: Annotated[Principal, Depends(caller)], s: Annotated[Services, Depends(services)]
) -> Response:
    models = await s.bus.models()
    body = ModelList(data=[ModelCard(id=m.id, created=STARTED, owned_by=m.owned_by) for m in models])
    return Response(body.model_dump_json(), media_type="application/json")


@router.get("/v1/models/{model_id:path}")
async def get_model(
    model_id: str, who: Annotated[Principal, Depends(caller)], s: Annotated[Services, Depends(services)]
) -> Response:
    for m in await s.bus.models():
        if m.id == model_id:
            card = ModelCard(id=m.id, created=STARTED, owned_by=m.owned_by)
            return Response(card.model_dump_json(), media_type="application/json")
    raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")
