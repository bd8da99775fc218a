"""Legacy completions, translated: a `/v1/completions` request into a job of the completion
task (`schemas.tasks`: raw prompts, no chat template), and a run's outcome into
`text_completion` JSON or SSE chunks.

Like `broker_api.chat_shape`, the one place that knows this API's JSON; serving, the job driver
and billing are shared. Legacy `logprobs: N` becomes the job's `logprobs: true, top_logprobs: N`
(what every worker reads) and comes back in the legacy form (tokens, token_logprobs,
top_logprobs as maps, text_offset). `echo` prepends each prompt to its choices' text (with
`logprobs` it is refused: no worker reports a prompt's logprobs). A single prompt answered
once can be continued on another node: the prompt is extended by the text already delivered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from broker_api.billing import Charge, served_by
from broker_api.chat_shape import ChunkStream, answer_fields
from broker_api.output import ChoiceResult
from broker_api.serving import Serving
from broker_api.session import Ask, Session
from schemas.chat import Usage
from schemas.completions import DEFAULT_MAX_TOKENS, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from schemas.errors import UnsupportedError
from schemas.events import Piece, TokenLogprob
from schemas.rules import estimate_request_prompt, requested_max_tokens
from schemas.tasks import TASK_KEY

_SAMPLING = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias")


def ask(req: CompletionRequest) -> Ask:
    if req.echo and req.logprobs is not None:
        raise UnsupportedError("echo with logprobs is not supported (no prompt logprobs).", param="echo")
    given = req.model_dump(exclude_none=True)
    body: dict[str, Any] = {TASK_KEY: "completion", "model": req.model, "prompt": req.prompts}
    body.update({k: given[k] for k in _SAMPLING if k in given})
    body["max_tokens"] = req.max_tokens or DEFAULT_MAX_TOKENS
    for k in ("suffix", "user"):
        if k in given:
            body[k] = given[k]
    if req.logprobs is not None:
        body["logprobs"], body["top_logprobs"] = True, req.logprobs
    body.update(req.model_extra or {})  # routing preferences (provider, models), usage.include
    n = req.n or 1
    single = len(req.prompts) == 1 and n == 1
    return Ask(
        model=req.model,
        body=body,
        choices=len(req.prompts) * n,
        token_limit=body["max_tokens"],
        prompt_estimate=estimate_request_prompt(body),
        stream=bool(req.stream),
        continuation=continue_prompt if single else None,
    )


def continue_prompt(request: dict[str, Any], delivered: str, tokens: int) -> dict[str, Any]:
    """The completion again, its prompt extended by what the client already has."""
    out = {**request, "prompt": [request["prompt"][0] + delivered]}
    limit = requested_max_tokens(request)
    if limit is not None:
        out["max_tokens"] = max(1, limit - tokens)
    return out


def _prompt_of(req: CompletionRequest, index: int) -> str:
    return req.prompts[index // (req.n or 1)]


def legacy_logprobs(logprobs: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets, at = [], offset
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def completion(req: CompletionRequest, s: Session, results: list[ChoiceResult], bill: Charge) -> Completion:
    choices = []
    for i, r in enumerate(results):
        prompt = _prompt_of(req, i)
        offset = len(prompt)
        choices.append(
            CompletionChoice(
                text=(prompt if req.echo else "") + r.text,
                index=i,
                logprobs=legacy_logprobs(r.logprobs, offset) if req.logprobs is not None else None,
                finish_reason=_finish(r.finish),  # type: ignore[arg-type]
            )
        )
    return Completion(choices=choices, **answer_fields(req, s, bill, "cmpl"))


class _Chunks:
    """Legacy completion chunks (`chat_shape.Chunks`)."""

    def __init__(self, req: CompletionRequest, s: Session) -> None:
        model, route = served_by(s)
        head: dict[str, Any] = {"id": f"cmpl-{s.job.id}", "object": "text_completion", "created": int(s.arrived)}
        head["model"] = model
        if route:
            head["provider"] = route
        self._head = head
        self._req = req
        self._offsets: dict[int, int] = {}
        self._echoed: set[int] = set()

    def text(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> str:
        prompt = _prompt_of(self._req, index)
        if self._req.echo and index not in self._echoed:
            text = prompt + text
        self._echoed.add(index)
        offset = self._offsets.get(index, len(prompt))
        lps = None
        if self._req.logprobs is not None:
            lps = legacy_logprobs(logprobs, offset).model_dump()
            self._offsets[index] = offset + sum(len(lp.token) for lp in logprobs)
        choice = {"text": text, "index": index, "logprobs": lps, "finish_reason": None}
        return json.dumps({**self._head, "choices": [choice]}, separators=(",", ":"))

    def piece(self, piece: Piece) -> list[str]:
        return [self.text(piece.index, piece.text, piece.text_logprobs)] if piece.text or piece.text_logprobs else []

    def finish(self, index: int, reason: str) -> str:
        prefix = _prompt_of(self._req, index) if self._req.echo and index not in self._echoed else ""
        choice = {"text": prefix, "index": index, "logprobs": None, "finish_reason": _finish(reason)}
        return json.dumps({**self._head, "choices": [choice]}, separators=(",", ":"))

    def usage(self, u: Usage) -> str:
        return json.dumps({**self._head, "choices": [], "usage": u.model_dump()}, separators=(",", ":"))


def stream(serving: Serving, s: Session, req: CompletionRequest) -> ChunkStream:
    """Legacy completions as SSE: a chunk per piece of text (with its legacy logprobs)."""
    return ChunkStream(serving, s, req, lambda: _Chunks(req, s), usage_chunk=req.wants_usage_chunk)
