"""Chat completions, translated: a request into a job (`ask`), and a run's outcome into
chat-completions JSON (`completion`) or SSE chunks (`stream`).

The one place that knows this API's JSON on the gateway: serving, the job driver and billing
deal in `Ask`, events and `Output`. Another API (Responses, legacy completions) gets a module
like this one and shares everything else: routing, limits, cache, idempotency, the ledger.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from pydantic import BaseModel

from broker_api.billing import Charge, served_by
from broker_api.output import ChoiceResult
from broker_api.serving import Serving
from broker_api.session import Ask, Session
from broker_api.web import data_frame
from schemas.chat import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ResponseMessage,
    TokenLogprobOut,
    ToolCallOut,
    Usage,
    logprob_json,
    tool_calls_json,
    wants_cost,
)
from schemas.chunks import ChunkEncoder
from schemas.errors import TokenyardError
from schemas.events import Piece
from schemas.rules import estimate_prompt_tokens, requested_max_tokens


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


def usage(req: BaseModel, bill: Charge) -> Usage:
    """The usage object of a chat or legacy completion (with its cost, where the request asked)."""
    u = Usage.of(bill.prompt_tokens, bill.completion_tokens)
    return u.model_copy(update={"cost": bill.cost}) if wants_cost(req) else u


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


def completion(req: ChatCompletionRequest, s: Session, results: list[ChoiceResult], bill: Charge) -> ChatCompletion:
    """The whole answer, naming the model and route that answered (`billing.served_by`)."""
    choices = [
        Choice(
            index=i,
            message=message(r),
            logprobs=logprobs(r, bool(req.logprobs)),
            finish_reason=r.finish,  # type: ignore[arg-type]
        )
        for i, r in enumerate(results)
    ]
    return ChatCompletion(choices=choices, **answer_fields(req, s, bill, "chatcmpl"))


def answer_fields(req: BaseModel, s: Session, bill: Charge, prefix: str) -> dict[str, Any]:
    """What a whole chat or legacy completion says beside its choices: its id, when it was
    asked, the model and route that answered (`billing.served_by`) and its usage."""
    model, route = served_by(s)
    return {
        "id": f"{prefix}-{s.job.id}",
        "created": int(s.arrived),
        "model": model,
        "usage": usage(req, bill),
        "provider": route or None,
    }


class Chunks(Protocol):
    """One API's chunk JSON, as `ChunkStream` sends it."""

    def piece(self, piece: Piece) -> list[str]: ...

    def finish(self, index: int, reason: str) -> str: ...

    def usage(self, usage: Usage) -> str: ...


def error_frame(e: TokenyardError) -> bytes:
    """An error once streaming, as a chunk: the error object as data."""
    return data_frame(json.dumps(e.body(), separators=(",", ":")))


class ChunkStream:
    """A stream of `data:` chunks ending in `[DONE]` (an `answering.Encoder`), as chat
    completions send it and legacy completions too: each piece's chunks, each choice's finish,
    the usage chunk when asked; an error once streaming is its error object as a chunk.
    `chunks` makes the API's chunk JSON when the first chunk is due (each chunk names what
    serves, known once the first output came)."""

    def __init__(
        self, serving: Serving, s: Session, req: BaseModel, chunks: Callable[[], Chunks], *, usage_chunk: bool
    ) -> None:
        self._serving, self._s, self._req = serving, s, req
        self._make, self._usage_chunk = chunks, usage_chunk
        self._made: Chunks | None = None

    def _chunks(self) -> Chunks:
        if self._made is None:
            self._made = self._make()
        return self._made

    def start(self) -> Iterator[bytes]:
        return iter(())  # every chunk names what serves: nothing opens the stream

    def piece(self, piece: Piece) -> Iterator[bytes]:
        for chunk in self._chunks().piece(piece):
            yield data_frame(chunk)

    def failed(self, e: TokenyardError) -> Iterator[bytes]:
        yield error_frame(e)

    async def end(self, results: list[ChoiceResult]) -> AsyncIterator[bytes]:
        for i, r in enumerate(results):
            yield data_frame(self._chunks().finish(i, r.finish))
        if self._usage_chunk:
            yield data_frame(self._chunks().usage(usage(self._req, self._serving.charge(self._s))))
        yield data_frame("[DONE]")


def stream(serving: Serving, s: Session, req: ChatCompletionRequest) -> ChunkStream:
    """Chat completions as SSE: each tool-call fragment a chunk of its own, in the order the
    worker sent them."""

    def chunks() -> ChunkEncoder:
        model, route = served_by(s)
        return ChunkEncoder(
            id=f"chatcmpl-{s.job.id}",
            created=int(s.arrived),
            model=model,
            include_usage=req.wants_usage_chunk,
            provider=route,
        )

    return ChunkStream(serving, s, req, chunks, usage_chunk=req.wants_usage_chunk)
