"""Embeddings, translated: a `/v1/embeddings` request into a job of the embedding task
(`schemas.tasks`: one vector per input), and its outcome into OpenAI's embedding list.

Vectors travel as float32 bytes (`Piece.embedding`); `encoding_format: base64` sends those
bytes as they are, `float` as JSON numbers. A batch whose job would not fit one NATS message
is refused with a 413 that says to split it (the vectors coming back are chunked by the worker
and never hit the limit). Embeddings are not streamed and not continued.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from broker_api.billing import Charge, served_by
from broker_api.output import ChoiceResult
from broker_api.session import Ask, Session
from schemas.embeddings import EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from schemas.errors import RequestTooLargeError, WorkerFailedError
from schemas.rules import estimate_request_prompt
from schemas.streams import MAX_JOB_BYTES
from schemas.tasks import TASK_KEY

JOB_ROOM = 16 * 1024  # bytes of a job message besides its request (envelope, reply subject)


def ask(req: EmbeddingRequest) -> Ask:
    body: dict[str, Any] = {TASK_KEY: "embedding", "model": req.model, "input": req.inputs}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    if req.user is not None:
        body["user"] = req.user
    body.update(req.model_extra or {})  # routing preferences (provider, models)
    size = len(json.dumps(body, ensure_ascii=False).encode())
    if size > MAX_JOB_BYTES - JOB_ROOM:
        raise RequestTooLargeError(
            f"The inputs are {size} bytes, more than one request may carry ({MAX_JOB_BYTES - JOB_ROOM}); "
            "split them into smaller batches."
        )
    return Ask(
        model=req.model,
        body=body,
        choices=len(req.inputs),
        token_limit=0,
        prompt_estimate=estimate_request_prompt(body),
        stream=False,
        continuation=None,
    )


def embedding_list(req: EmbeddingRequest, s: Session, results: list[ChoiceResult], bill: Charge) -> EmbeddingList:
    data = []
    for i, r in enumerate(results):
        if not r.embedding or len(r.embedding) % 4:
            raise WorkerFailedError(f"The worker sent no vector for input {i}.", code="embedding_missing")
        if req.encoding_format == "base64":
            value: list[float] | str = base64.b64encode(r.embedding).decode("ascii")
        else:
            value = list(struct.unpack(f"<{len(r.embedding) // 4}f", r.embedding))
        data.append(EmbeddingData(index=i, embedding=value))
    model, route = served_by(s)
    return EmbeddingList(
        data=data,
        model=model,
        usage=EmbeddingUsage(prompt_tokens=bill.prompt_tokens, total_tokens=bill.prompt_tokens),
        provider=route or None,
    )
