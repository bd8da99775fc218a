"""OpenAI's routes: `POST /v1/chat/completions` and `GET /v1/models[/{id}]`.

Thin: authenticate, read and validate the body, translate it (`broker_api.chat_shape`), and
take the steps every OpenAI route shares (`broker_api.answering`: open and start the session,
answer as JSON or an SSE stream, with the headers that say how it was answered). The chat
route is a plain Starlette route: the hot path skips FastAPI's dependency machinery (it reads
and validates the body itself) and takes its collaborators from `deps.services(request)`.
"""

from __future__ import annotations

import time
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from broker_api import answering, chat_shape
from broker_api.auth import Principal
from broker_api.deps import Services, caller, services
from schemas.chat import ChatCompletion, ModelCard, ModelList, parse_chat_request
from schemas.errors import ModelNotFoundError
from schemas.rules import check_max_tokens

log = structlog.get_logger(__name__)

STARTED = int(time.time())  # what /v1/models reports as every model's `created`
# OpenRouter's fields beyond OpenAI's that the gateway honours (routing, cost): not "unknown".
HONOURED_EXTRAS = frozenset({"provider", "models", "usage", "transforms"})

router = APIRouter()


async def chat_completions(request: Request) -> Response:
    s = services(request)
    who, body = await answering.caller_and_body(request, s)
    req = parse_chat_request(body)
    unknown = sorted(set(req.model_extra or ()) - HONOURED_EXTRAS)
    if unknown:
        log.info("api.unknown_fields", fields=unknown)
    who.check_model(req.model)
    check_max_tokens(req.model_dump(include={"max_tokens", "max_completion_tokens"}), who.key_limits, who.org_limits)
    session = await answering.begin(request, s, who, chat_shape.ask(req))
    serving = s.serving
    if not req.stream:

        async def answer() -> ChatCompletion:
            results = await serving.results(session)
            return chat_shape.completion(req, session, results, serving.charge(session))

        return await answering.answer_json(request, s, session, answer)
    return await answering.answer_stream(s, session, chat_shape.stream(serving, session, req))


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
