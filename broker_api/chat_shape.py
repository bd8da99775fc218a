"""Chat completions, translated: a request into a job (`ask`), and a run's outcome into
chat-completions JSON (`completion`) or SSE chunks (`payloads`).

The one place that knows this API's JSON on the gateway: serving, the job driver and billing
deal in `Ask`, events and `Output`. Another API (Responses, legacy completions) gets a module
like this one and shares everything else: routing, limits, cache, idempotency, the ledger.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import structlog

from broker_api.billing import Charge
from broker_api.output import ChoiceResult
from broker_api.serving import Serving
from broker_api.session import Ask, Session
from schemas.chat import ChatCompletion, ChatCompletionRequest, Choice, ChunkEncoder, ResponseMessage, Usage
from schemas.errors import TokenyardError
from schemas.rules import estimate_prompt_tokens, requested_max_tokens

log = structlog.get_logger(__name__)


def ask(req: ChatCompletionRequest) -> Ask:
    """What serving needs of a validated request; the job's request is the body as sent, less
    the fields only the gateway reads (streaming is between the gateway and its client)."""
    body = req.model_dump(exclude_none=True, exclude={"stream", "stream_options"})
    return Ask(
        model=req.model,
        body=body,
        choices=req.n or 1,
        token_limit=req.token_limit,
        prompt_estimate=estimate_prompt_tokens(body["messages"]),
        stream=bool(req.stream),
        continuation=continue_answer,
    )


def continue_answer(request: dict[str, Any], delivered: str, tokens: int) -> dict[str, Any]:
    """The request again, asked to carry on from the assistant text the client already has,
    with what is left of its completion budget."""
    out = dict(request)
    out["messages"] = [*request["messages"], {"role": "assistant", "content": delivered}]
    limit = requested_max_tokens(request)
    if limit is not None:
        out.pop("max_tokens", None)
        out["max_completion_tokens"] = max(1, limit - tokens)
    return out


def usage(req: ChatCompletionRequest, bill: Charge) -> Usage:
    u = Usage.of(bill.prompt_tokens, bill.completion_tokens)
    return u.model_copy(update={"cost": bill.cost}) if req.wants_cost else u


def completion(req: ChatCompletionRequest, s: Session, results: list[ChoiceResult], bill: Charge) -> ChatCompletion:
    choices = [
        Choice(
            index=i,
            message=ResponseMessage(content=r.text, refusal=None),
            logprobs=None,
            finish_reason=r.finish,  # type: ignore[arg-type]
        )
        for i, r in enumerate(results)
    ]
    return ChatCompletion(
        id=f"chatcmpl-{s.job.id}", created=int(s.arrived), model=req.model, choices=choices, usage=usage(req, bill)
    )


async def payloads(serving: Serving, s: Session, req: ChatCompletionRequest) -> AsyncGenerator[str, None]:
    """SSE `data:` payloads. The first is produced before the HTTP response starts, so any
    error up to then is still an HTTP error; after it, errors become an error event."""
    enc = ChunkEncoder(
        id=f"chatcmpl-{s.job.id}", created=int(s.arrived), model=req.model, include_usage=req.wants_usage_chunk
    )
    if s.cached is not None:
        results = await serving.results(s)
        for i, r in enumerate(results):
            if r.text:
                yield enc.content(i, r.text)
    else:
        events = serving.events(s)
        try:
            async for ev in events:
                s.run.commit()
                for piece in ev.pieces:
                    if piece.text:
                        yield enc.content(piece.index, piece.text)
        except TokenyardError as e:
            if not s.run.committed:
                raise
            log.warning("job.stream_failed", job_id=s.job.id, error=e.message)
            yield json.dumps(e.body(), separators=(",", ":"))
            return
        finally:
            await events.aclose()
        if s.done is None:  # events() ends only at a DONE or by raising
            raise TokenyardError("The job ended without an answer.")
        results = s.output.results(s.done)
    for i, r in enumerate(results):
        yield enc.finish(i, r.finish)
    if req.wants_usage_chunk:
        yield enc.usage(usage(req, serving.charge(s)))
    yield "[DONE]"
