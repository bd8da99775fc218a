"""`POST /v1/embeddings`: translated by `broker_api.embeddings_shape` onto the same jobs as chat
(`broker_api.answering` does the rest); always one JSON answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker_api import embeddings_shape
from broker_api.answering import answer_json, begin, caller_and_body
from broker_api.deps import services
from schemas.embeddings import EmbeddingList, parse_embedding_request

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> Response:
    s = services(request)
    who, body = await caller_and_body(request, s)
    req = parse_embedding_request(body)
    session = await begin(request, s, who, embeddings_shape.ask(req))

    async def answer() -> EmbeddingList:
        results = await s.serving.results(session)
        bill = s.serving.charge(session)
        return embeddings_shape.embedding_list(req, session, results, bill)

    return await answer_json(request, s, session, answer)
