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
from schemas.chat import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkEncoder,
    ResponseMessage,
    TokenLogprobOut,
    ToolCallOut,
    Usage,
    logprob_json,
    tool_calls_json,
)
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


def message(r: ChoiceResult) -> ResponseMessage:
    """A finished choice's message: its text (null when it only called tools) and its tool
    calls, each call's fragments joined."""
    calls = [ToolCallOut.model_validate(c) for c in tool_calls_json(r.tool_calls)]
    content = r.text if r.text or not calls else None
    return ResponseMessage(content=content, refusal=None, tool_calls=calls or None)


def logprobs(r: ChoiceResult, asked: bool) -> ChoiceLogprobs | None:
    if not asked:
        return None
    return ChoiceLogprobs(content=[TokenLogprobOut.model_validate(logprob_json(lp)) for lp in r.logprobs])


def completion(
    req: ChatCompletionRequest, s: Session, results: list[ChoiceResult], bill: Charge, *, served: tuple[str, str]
) -> ChatCompletion:
    """The whole answer; `served` is the (model, route) that answered (`Serving.served_by`)."""
    choices = [
        Choice(
            index=i,
            message=message(r),
            logprobs=logprobs(r, bool(req.logprobs)),
            finish_reason=r.finish,  # type: ignore[arg-type]
        )
        for i, r in enumerate(results)
    ]
    model, route = served
    return ChatCompletion(
        id=f"chatcmpl-{s.job.id}",
        created=int(s.arrived),
        model=model,
        choices=choices,
        usage=usage(req, bill),
        provider=route or None,
    )


async def payloads(serving: Serving, s: Session, req: ChatCompletionRequest) -> AsyncGenerator[str, None]:
    """SSE `data:` payloads. The first is produced before the HTTP response starts, so any
    error up to then is still an HTTP error; after it, errors become an error event. Each
    tool-call fragment is a chunk of its own, in the order the worker sent them."""
    enc: ChunkEncoder | None = None

    def encoder() -> ChunkEncoder:  # once the first output came: it names what serves
        nonlocal enc
        if enc is None:
            model, route = serving.served_by(s)
            enc = ChunkEncoder(
                id=f"chatcmpl-{s.job.id}",
                created=int(s.arrived),
                model=model,
                include_usage=req.wants_usage_chunk,
                provider=route,
            )
        return enc

    if s.cached is not None:
        results = await serving.results(s)
        for i, r in enumerate(results):
            if r.text or r.logprobs:
                yield encoder().content(i, r.text, r.logprobs)
            for fragment in r.tool_calls:
                yield encoder().tool_call(i, fragment)
    else:
        events = serving.events(s)
        try:
            async for ev in events:
                s.run.commit()
                for piece in ev.pieces:
                    for chunk in encoder().piece(piece):
                        yield chunk
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
        yield encoder().finish(i, r.finish)
    if req.wants_usage_chunk:
        yield encoder().usage(usage(req, serving.charge(s)))
    yield "[DONE]"
