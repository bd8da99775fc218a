"""The Responses API's shapes (`/v1/responses`): the request we accept, the `Response` object,
and what is stored for `previous_response_id`.

Reference: OpenAI's published OpenAPI spec (`CreateResponse`, `Response`, `ResponseStreamEvent`)
and the Open Responses specification, which peers implement. What is served: `input` as a
string or as items (messages with text parts, `function_call` and `function_call_output`
items), `instructions`, function tools, `tool_choice`, `parallel_tool_calls`, `text.format`
(text, json_object, json_schema), `max_output_tokens`, sampling, `top_logprobs`,
`previous_response_id`, `store`, `stream`. Other tool types, other item types and
`background: true` are refused with a 400 naming the parameter.

`StoredResponse` is what the gateway keeps per org in the responses bucket: the `Response` as
sent, and the conversation as chat messages (its input items and its output, without its
instructions, which do not carry over), so a follow-up continues from it. One too large for a
NATS message is kept in parts beside a `StoredParts` head (`broker_api.response_store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from schemas.chat import FunctionDefinition, Metadata
from schemas.codec import WireError, need, pack, unpack
from schemas.errors import InvalidRequestError, UnsupportedError
from schemas.tasks import TASK_KEY
from schemas.validation import parse_body


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- request --------------------------------------------------------------------------


class InputText(_Lenient):
    """A text part: `input_text` in a user/system/developer message, `output_text` (or a
    `refusal`) in an assistant message given back as history."""

    type: Literal["input_text", "output_text", "refusal", "text"]
    text: str | None = None
    refusal: str | None = None


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=64)
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None


InputItem = Annotated[Union[MessageItem, FunctionCallItem, FunctionCallOutputItem], Field(discriminator="type")]


class FunctionTool(FunctionDefinition):
    """A function tool as the Responses API takes it: chat's function definition, flat, with
    its `type` beside it (chat nests it: `{"type": "function", "function": {...}}`)."""

    type: Literal["function"]


class ToolChoiceFunction(_Lenient):
    type: Literal["function"]
    name: str


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextParam(_Lenient):
    format: TextFormat | None = None


class ResponseRequest(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem] = Field(default="")
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(default=None, max_length=128)
    store: bool | None = None
    stream: bool | None = None
    background: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    metadata: Metadata | None = None
    user: str | None = Field(default=None, max_length=256)
    text: TextParam | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None

    @property
    def stores(self) -> bool:
        return self.store is not False

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.top_logprobs) or "message.output_text.logprobs" in (self.include or [])


def parse_response_request(body: Any) -> ResponseRequest:
    """Validate a body: what this gateway does not serve is refused naming its parameter (other
    item and tool types, background responses); a message item may omit its `type`."""
    if isinstance(body, dict):
        if TASK_KEY in body:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {TASK_KEY}", param=TASK_KEY)
        items = body.get("input")
        if isinstance(items, list):
            fixed = []
            for i, item in enumerate(items):
                if isinstance(item, dict) and "type" not in item and "role" in item:
                    item = {**item, "type": "message"}
                kind = item.get("type") if isinstance(item, dict) else None
                if kind not in {"message", "function_call", "function_call_output"}:
                    raise UnsupportedError(
                        f"Input items of type {kind!r} are not supported.",
                        param=f"input[{i}]",
                        code="unsupported_value",
                    )
                fixed.append(item)
            body = {**body, "input": fixed}
        tools = body.get("tools")
        for i, tool in enumerate(tools if isinstance(tools, list) else []):  # not a list: pydantic says so
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise UnsupportedError(
                    f"Tools of type {kind!r} are not supported; only function tools are.",
                    param=f"tools[{i}]",
                    code="unsupported_value",
                )
        if body.get("background"):
            raise UnsupportedError("Background responses are not supported.", param="background")
    return parse_body(ResponseRequest, body)


# --- the Response object --------------------------------------------------------------


def _is_none(value: Any) -> bool:
    return value is None


class TopLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogProb]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[LogProb] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Union[OutputMessage, FunctionCall]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int
    cost: float | None = Field(default=None, exclude_if=_is_none)  # USD, when asked (OpenRouter's usage.include)

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> ResponseUsage:
        return cls(
            input_tokens=prompt,
            input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=completion,
            total_tokens=prompt + completion,
        )


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


Status = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = Field(default=None, exclude_if=_is_none)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = Field(default=None, exclude_if=_is_none)  # the spec's is not nullable
    user: str | None = Field(default=None, exclude_if=_is_none)
    metadata: dict[str, str] = Field(default_factory=dict)
    provider: str | None = Field(default=None, exclude_if=_is_none)  # the route that served


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# --- what is stored -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A stored response: its JSON as sent, and the conversation (chat messages) it ended."""

    response: dict[str, Any]
    messages: list[dict[str, Any]]

    def encode(self) -> bytes:
        return pack({"resp": self.response, "msgs": self.messages})

    @classmethod
    def decode(cls, data: bytes) -> StoredResponse:
        o = unpack(data)
        response, messages = need(o, "resp"), need(o, "msgs")
        if not isinstance(response, dict) or not isinstance(messages, list):
            raise WireError("a stored response holds a response map and a message list")
        return cls(response, messages)


MAX_PARTS = 64  # parts of one stored response (32 MiB of 512 KiB parts: far beyond what a job may carry)


@dataclass(frozen=True, slots=True)
class StoredParts:
    """The head of a stored response too large for one message: its encoded `StoredResponse`
    is `size` bytes, whose SHA-256 is `digest`, in `parts` entries beside the head."""

    parts: int
    size: int
    digest: str

    def encode(self) -> bytes:
        return pack({"parts": self.parts, "size": self.size, "sha256": self.digest})


def decode_stored(data: bytes) -> StoredResponse | StoredParts:
    """A responses-bucket head: the stored response itself, or the head of one kept in parts."""
    o = unpack(data)
    if "parts" not in o:
        return StoredResponse.decode(data)
    parts, size, digest = need(o, "parts"), need(o, "size"), need(o, "sha256")
    if not isinstance(parts, int) or not 1 <= parts <= MAX_PARTS or not isinstance(size, int) or size < 0:
        raise WireError(f"a stored response's head names {parts!r} parts of {size!r} bytes")
    if not isinstance(digest, str):
        raise WireError("a stored response's head holds no digest")
    return StoredParts(parts, size, digest)
