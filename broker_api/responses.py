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
    stream  -> events                      `broker_api.responses_stream`

The job runs like any chat job (routing, limits, cache, idempotency, the ledger); this module
knows nothing of them. What is stored for a follow-up is the conversation as chat messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog

from broker_api.billing import Charge, served_by
from broker_api.output import ChoiceResult
from broker_api.session import Ask, Session
from schemas.chat import logprob_json, tool_calls_json, wants_cost
from schemas.errors import InvalidRequestError
from schemas.events import TokenLogprob
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


def logprobs_out(logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[LogProb]:
    out = []
    for lp in logprobs:
        j = logprob_json(lp)
        j["bytes"] = j["bytes"] or list(lp.token.encode())
        for t in j["top_logprobs"]:
            t["bytes"] = t["bytes"] or list(t["token"].encode())
        out.append(LogProb.model_validate(j))
    return out


def output_items(s: Session, r: ChoiceResult) -> list[OutputItem]:
    """The answer's output items. Where max_output_tokens cut it, the last item is the one it
    cut, "incomplete" (a function call's arguments as far as they were generated); the items
    before it were whole. The stream's items say the same (`responses_stream`)."""
    items: list[OutputItem] = []
    calls = tool_calls_json(r.tool_calls)
    if r.text or not calls:
        items.append(
            OutputMessage(
                id=f"msg_{s.job.id}",
                status="completed",
                content=[OutputText(text=r.text, logprobs=logprobs_out(r.logprobs))],
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
    if r.finish == "length":
        items[-1] = items[-1].model_copy(update={"status": "incomplete"})
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
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
        finish: str = "stop",
    ) -> Response:
        model, route = served_by(self.s)
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
            tools=[_tool_json(t) for t in req.tools or []],
            usage=usage,
            user=req.user,
            metadata=req.metadata or {},
            provider=route or None,
        )

    def final(self, r: ChoiceResult, bill: Charge) -> Response:
        return self.response(
            status="incomplete" if r.finish == "length" else "completed",
            output=output_items(self.s, r),
            usage=usage(self.req, bill),
        )


def _tool_json(tool: FunctionTool) -> dict[str, Any]:
    """A function tool as a Response echoes it (`type` first, `strict` and `parameters` always present)."""
    given = tool.model_dump(exclude_none=True, exclude={"type"})
    return {"type": tool.type, **given, "strict": tool.strict, "parameters": tool.parameters}


def usage(req: ResponseRequest, bill: Charge) -> ResponseUsage:
    u = ResponseUsage.of(bill.prompt_tokens, bill.completion_tokens, bill.cached_tokens)
    return u.model_copy(update={"cost": bill.cost}) if wants_cost(req) else u


def stored(conversation: list[dict[str, Any]], r: ChoiceResult, response: Response) -> StoredResponse:
    """What a follow-up continues from: the conversation and this answer, as chat messages."""
    calls = tool_calls_json(r.tool_calls)
    turn: dict[str, Any] = {"role": "assistant", "content": r.text or None}
    if calls:
        turn["tool_calls"] = calls
    return StoredResponse(response.model_dump(mode="json"), [*conversation, turn])
