"""The Responses API, translated in one place: a `/v1/responses` request (with the conversation
of its `previous_response_id`) into a chat job, and the job's outcome into a `Response`, its
output items and its stream of events.

    request -> chat job                    instructions -> a system message (not carried over)
                                           stored conversation + input items -> messages:
                                             message items -> role/text messages
                                             function_call items -> an assistant's tool_calls
                                             function_call_output -> a tool message
                                           function tools, tool_choice, text.format,
                                           max_output_tokens, top_logprobs -> chat's fields
    outcome -> Response.output             the text as one `message` item (`output_text`, with
                                           logprobs), each tool call a `function_call` item
    stream  -> events                      response.created, response.in_progress, then per
                                           item: output_item.added, (content_part.added,
                                           output_text.delta..., output_text.done,
                                           content_part.done | function_call_arguments.delta...,
                                           function_call_arguments.done), output_item.done;
                                           response.completed (or .incomplete); after an error
                                           once streaming: error and response.failed

The job runs like any chat job (routing, limits, cache, idempotency, the ledger); this module
knows nothing of them. What is stored for a follow-up is the conversation as chat messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker_api.billing import Charge
from broker_api.output import ChoiceResult
from broker_api.serving import Serving
from broker_api.session import Ask, Session
from schemas.chat import logprob_json, tool_calls_json
from schemas.errors import InvalidRequestError, TokenyardError
from schemas.events import Piece, TokenLogprob
from schemas.responses import (
    FunctionCall,
    FunctionTool,
    IncompleteDetails,
    InputText,
    LogProb,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
    ResponseRequest,
    ResponseUsage,
    StoredResponse,
)
from schemas.rules import estimate_prompt_tokens

log = structlog.get_logger(__name__)

Event = tuple[str, str]  # (type, JSON): one SSE event


def response_id(s: Session) -> str:
    return f"resp_{s.job.id}"


# --- request -> job ---------------------------------------------------------------------------


def _text(content: str | list[InputText]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text or part.refusal or "" for part in content)


def history(req: ResponseRequest, previous: StoredResponse | None) -> list[dict[str, Any]]:
    """The conversation as chat messages: the stored one, then this request's input items."""
    messages: list[dict[str, Any]] = list(previous.messages) if previous is not None else []
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}] if req.input else messages
    for item in req.input:
        if item.type == "message":
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content)})
        elif item.type == "function_call":
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"] = [*last["tool_calls"], call]  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return messages


def _tool_choice(req: ResponseRequest) -> Any:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(req: ResponseRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise InvalidRequestError("text.format.schema is required for json_schema.", param="text.format.schema")
    spec: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


def ask(req: ResponseRequest, previous: StoredResponse | None) -> tuple[Ask, list[dict[str, Any]]]:
    """The chat job's Ask, and the conversation it carries (without the instructions)."""
    conversation = history(req, previous)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    if not messages:
        raise InvalidRequestError("input must not be empty.", param="input")
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    given = req.model_dump(exclude_none=True, include={"temperature", "top_p", "seed", "user", "parallel_tool_calls"})
    body.update(given)
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in req.tools
        ]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req)
    response_format = _response_format(req)
    if response_format is not None:
        body["response_format"] = response_format
    if req.wants_logprobs:
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    extra = {k: v for k, v in (req.model_extra or {}).items() if k in {"provider", "models", "usage"}}
    body.update(extra)
    return (
        Ask(
            model=req.model,
            body=body,
            choices=1,
            token_limit=req.max_output_tokens,
            prompt_estimate=estimate_prompt_tokens(messages),
            stream=bool(req.stream),
            continuation=None,
        ),
        conversation,
    )


# --- outcome -> Response --------------------------------------------------------------------


def _logprobs(logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[LogProb]:
    out = []
    for lp in logprobs:
        j = logprob_json(lp)
        j["bytes"] = j["bytes"] or list(lp.token.encode())
        for t in j["top_logprobs"]:
            t["bytes"] = t["bytes"] or list(t["token"].encode())
        out.append(LogProb.model_validate(j))
    return out


def output_items(s: Session, r: ChoiceResult) -> list[OutputItem]:
    status = "incomplete" if r.finish == "length" else "completed"
    items: list[OutputItem] = []
    calls = tool_calls_json(r.tool_calls)
    if r.text or not calls:
        items.append(
            OutputMessage(
                id=f"msg_{s.job.id}",
                status=status,  # type: ignore[arg-type]
                content=[OutputText(text=r.text, logprobs=_logprobs(r.logprobs))],
            )
        )
    for k, call in enumerate(calls):
        items.append(
            FunctionCall(
                id=f"fc_{s.job.id}_{k}",
                call_id=call["id"],
                name=call["function"]["name"],
                arguments=call["function"]["arguments"],
                status="completed",
            )
        )
    return items


@dataclass(frozen=True, slots=True)
class Shaper:
    """One request's Response, in any state: what it echoes of the request, and its output."""

    req: ResponseRequest
    s: Session

    def response(
        self,
        *,
        status: str,
        output: list[OutputItem],
        served: tuple[str, str] = ("", ""),
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
        finish: str = "stop",
    ) -> Response:
        model, route = served
        req = self.req
        return Response(
            id=response_id(self.s),
            created_at=int(self.s.arrived),
            status=status,  # type: ignore[arg-type]
            completed_at=int(time.time()) if status == "completed" else None,
            error=error,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            model=model or req.model,
            output=output,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id,
            store=req.stores,
            temperature=req.temperature if req.temperature is not None else 1.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            top_logprobs=req.top_logprobs,
            text={"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
            if req.text is not None and req.text.format is not None
            else {"format": {"type": "text"}},
            tool_choice=(
                req.tool_choice.model_dump()
                if req.tool_choice is not None and not isinstance(req.tool_choice, str)
                else req.tool_choice or "auto"
            ),
            tools=[
                t.model_dump(exclude_none=True) | {"strict": t.strict, "parameters": t.parameters}
                for t in req.tools or []
            ],
            usage=usage,
            user=req.user,
            metadata=req.metadata or {},
            provider=route or None,
        )

    def final(self, r: ChoiceResult, bill: Charge, served: tuple[str, str]) -> Response:
        return self.response(
            status="incomplete" if r.finish == "length" else "completed",
            output=output_items(self.s, r),
            served=served,
            usage=usage(self.req, bill),
        )


def _tool_json(tool: FunctionTool) -> dict[str, Any]:
    """A function tool as a Response echoes it (`strict` and `parameters` always present)."""
    return {**tool.model_dump(exclude_none=True), "strict": tool.strict, "parameters": tool.parameters}


def usage(req: ResponseRequest, bill: Charge) -> ResponseUsage:
    u = ResponseUsage.of(bill.prompt_tokens, bill.completion_tokens, bill.cached_tokens)
    extra = (req.model_extra or {}).get("usage")
    return u.model_copy(update={"cost": bill.cost}) if isinstance(extra, dict) and extra.get("include") else u


def stored(conversation: list[dict[str, Any]], r: ChoiceResult, response: Response) -> StoredResponse:
    """What a follow-up continues from: the conversation and this answer, as chat messages."""
    calls = tool_calls_json(r.tool_calls)
    turn: dict[str, Any] = {"role": "assistant", "content": r.text or None}
    if calls:
        turn["tool_calls"] = calls
    return StoredResponse(response.model_dump(mode="json"), [*conversation, turn])


# --- the stream -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    """The output item being streamed."""

    index: int  # output_index
    kind: str  # "message" | "function_call"
    item: dict[str, Any]
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    call: int = -1  # the tool call's index among the choice's calls


class EventWriter:
    """Turns pieces into Responses stream events, numbered in sequence."""

    def __init__(self, shaper: Shaper) -> None:
        self._shaper = shaper
        self._seq = 0
        self._items: list[dict[str, Any]] = []
        self._open: _Open | None = None
        self._job = shaper.s.job.id

    def _event(self, kind: str, **fields: Any) -> Event:
        body = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return kind, json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    def start(self, served: tuple[str, str]) -> Iterator[Event]:
        pending = self._shaper.response(status="in_progress", output=[], served=served).model_dump(mode="json")
        yield self._event("response.created", response=pending)
        yield self._event("response.in_progress", response=pending)

    def piece(self, piece: Piece) -> Iterator[Event]:
        if piece.text:
            yield from self._ensure_message()
            assert self._open is not None
            self._open.text.append(piece.text)
            self._open.logprobs.extend(piece.logprobs)
            yield self._event(
                "response.output_text.delta",
                item_id=self._open.item["id"],
                output_index=self._open.index,
                content_index=0,
                delta=piece.text,
                logprobs=[lp.model_dump() for lp in _logprobs(piece.logprobs)],
            )
        for f in piece.tool_calls:
            if self._open is None or self._open.kind != "function_call" or self._open.call != f.index:
                yield from self._close()
                item = {
                    "id": f"fc_{self._job}_{f.index}",
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": f.id,
                    "name": f.name,
                    "arguments": "",
                }
                self._open = _Open(len(self._items), "function_call", item, call=f.index)
                yield self._event("response.output_item.added", output_index=self._open.index, item=item)
            if f.arguments:
                self._open.text.append(f.arguments)
                yield self._event(
                    "response.function_call_arguments.delta",
                    item_id=self._open.item["id"],
                    output_index=self._open.index,
                    delta=f.arguments,
                )

    def _ensure_message(self) -> Iterator[Event]:
        if self._open is not None and self._open.kind == "message":
            return
        yield from self._close()
        item = {
            "id": f"msg_{self._job}",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._open = _Open(len(self._items), "message", item)
        yield self._event("response.output_item.added", output_index=self._open.index, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield self._event(
            "response.content_part.added", item_id=item["id"], output_index=self._open.index, content_index=0, part=part
        )

    def _close(self, status: str = "completed") -> Iterator[Event]:
        o, self._open = self._open, None
        if o is None:
            return
        text = "".join(o.text)
        if o.kind == "message":
            logprobs = [lp.model_dump() for lp in _logprobs(o.logprobs)]
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
            ids = {"item_id": o.item["id"], "output_index": o.index, "content_index": 0}
            yield self._event("response.output_text.done", **ids, text=text, logprobs=logprobs)
            yield self._event("response.content_part.done", **ids, part=part)
            item = {**o.item, "status": status, "content": [part]}
        else:
            yield self._event(
                "response.function_call_arguments.done",
                item_id=o.item["id"],
                output_index=o.index,
                name=o.item["name"],
                arguments=text,
            )
            item = {**o.item, "status": "completed", "arguments": text}
        self._items.append(item)
        yield self._event("response.output_item.done", output_index=o.index, item=item)

    def end(self, final: Response) -> Iterator[Event]:
        yield from self._close("incomplete" if final.status == "incomplete" else "completed")
        kind = "response.incomplete" if final.status == "incomplete" else "response.completed"
        yield self._event(kind, response=final.model_dump(mode="json"))

    def failed(self, e: TokenyardError, served: tuple[str, str]) -> Iterator[Event]:
        yield from self._close("incomplete")
        yield self._event("error", code=e.code or e.type, message=e.message, param=e.param)
        code = "rate_limit_exceeded" if e.status == 429 else "server_error"
        response = self._shaper.response(
            status="failed", output=[], served=served, error=ResponseError(code=code, message=e.message)
        )
        yield self._event("response.failed", response=response.model_dump(mode="json"))


async def events(serving: Serving, s: Session, shaper: Shaper, on_final: Any) -> AsyncGenerator[Event, None]:
    """The stream's events. The first is produced only once the job's first output came (or its
    stored answer), so an error before it is still an HTTP error. `on_final(result, response)`
    runs once the answer is whole (to store it)."""
    writer = EventWriter(shaper)
    started = False
    if s.cached is not None:
        (result,) = await serving.results(s)
        for event in writer.start(serving.served_by(s)):
            yield event
        for piece in (Piece(0, result.text, 0, result.tool_calls, result.logprobs),):
            for event in writer.piece(piece):
                yield event
    else:
        stream = serving.events(s)
        try:
            async for ev in stream:
                s.run.commit()
                if not started:
                    started = True
                    for event in writer.start(serving.served_by(s)):
                        yield event
                for piece in ev.pieces:
                    for event in writer.piece(piece):
                        yield event
        except TokenyardError as e:
            if not s.run.committed:
                raise
            log.warning("job.stream_failed", job_id=s.job.id, error=e.message)
            for event in writer.failed(e, serving.served_by(s)):
                yield event
            return
        finally:
            await stream.aclose()
        if s.done is None:
            raise TokenyardError("The job ended without an answer.")
        (result,) = s.output.results(s.done)
    final = shaper.final(result, serving.charge(s), serving.served_by(s))
    await on_final(result, final)
    for event in writer.end(final):
        yield event
