"""`POST /v1/completions`: legacy completions, translated by `broker_api.completions_shape`
onto the same jobs as chat (`broker_api.answering` does the rest)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker_api import completions_shape
from broker_api.answering import answer_json, answer_stream, begin, caller_and_body
from broker_api.deps import services
from schemas.completions import Completion, parse_completion_request
from schemas.rules import check_max_tokens

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    s = services(request)
    who, body = await caller_and_body(request, s)
    req = parse_completion_request(body)
    check_max_tokens({"max_tokens": req.max_tokens}, who.key_limits, who.org_limits)
    session = await begin(request, s, who, completions_shape.ask(req))
    if req.stream:
        return await answer_stream(s, session, completions_shape.stream(s.serving, session, req))

    async def answer() -> Completion:
        results = await s.serving.results(session)
        bill = s.serving.charge(session)
        return completions_shape.completion(req, session, results, bill)

    return await answer_json(request, s, session, answer)
