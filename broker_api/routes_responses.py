"""The Responses API's routes: `POST /v1/responses` (streamed or not), `GET` and `DELETE
/v1/responses/{id}`. The translation is `broker_api.responses`; stored answers are
`broker_api.response_store` (per org: another org's ids answer 404)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from broker_api import responses, responses_stream
from broker_api.answering import answer_json, answer_stream, begin, caller_and_body
from broker_api.auth import Principal
from broker_api.deps import Services, caller, services
from broker_api.output import ChoiceResult
from schemas.errors import InvalidRequestError, NotFoundError
from schemas.responses import DeletedResponse, parse_response_request
from schemas.responses import Response as ResponseObject
from schemas.rules import check_max_tokens

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    s = services(request)
    who, body = await caller_and_body(request, s)
    req = parse_response_request(body)
    check_max_tokens({"max_tokens": req.max_output_tokens}, who.key_limits, who.org_limits)
    previous = None
    if req.previous_response_id:
        previous = await s.responses.get(who.org, who.project, req.previous_response_id)
        if previous is None:
            raise InvalidRequestError(
                f"Previous response with id '{req.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
    ask, conversation = responses.ask(req, previous)
    session = await begin(request, s, who, ask)
    shaper = responses.Shaper(req, session)

    async def keep(result: ChoiceResult, final: ResponseObject) -> None:
        if req.stores:
            await s.responses.put(who.org, who.project, final.id, responses.stored(conversation, result, final))

    if req.stream:
        return await answer_stream(s, session, responses_stream.ResponseStream(s.serving, session, shaper, keep))

    async def answer() -> ResponseObject:
        (result,) = await s.serving.results(session)
        final = shaper.final(result, s.serving.charge(session))
        await keep(result, final)
        return final

    return await answer_json(request, s, session, answer)


@router.get("/v1/responses/{response_id}")
async def get_response(
    response_id: str, who: Annotated[Principal, Depends(caller)], s: Annotated[Services, Depends(services)]
) -> dict[str, Any]:
    found = await s.responses.get(who.org, who.project, response_id)
    if found is None:
        raise NotFoundError(f"No response with id '{response_id}'.", param="response_id")
    return found.response


@router.delete("/v1/responses/{response_id}")
async def delete_response(
    response_id: str, who: Annotated[Principal, Depends(caller)], s: Annotated[Services, Depends(services)]
) -> dict[str, Any]:
    if not await s.responses.delete(who.org, who.project, response_id):
        raise NotFoundError(f"No response with id '{response_id}'.", param="response_id")
    return DeletedResponse(id=response_id).model_dump()
