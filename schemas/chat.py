"""OpenAI chat-completion shapes: the request we accept and the responses we send.

Reference: OpenAI's published OpenAPI spec (`CreateChatCompletionRequest`,
`CreateChatCompletionResponse`, `CreateChatCompletionStreamResponse`, `Model`). Requests
accept unknown fields (clients send provider extras) and keep them in `model_extra` so the
gateway can log their names; every known field is validated to OpenAI's ranges.

Responses are built with every required-but-nullable field set explicitly and serialised with
`exclude_unset=True`, so a field OpenAI marks required is always present (possibly null) and
an optional one appears only when we set it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.events import TokenLogprob, ToolCallDelta
from schemas.tasks import TASK_KEY
from schemas.validation import parse_body


class _Lenient(BaseModel):
    """Accepts unknown fields (kept in `model_extra`)."""

    model_config = ConfigDict(extra="allow")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- request --------------------------------------------------------------------------


class ContentPart(_Lenient):
    """One part of an array `content`. Text parts are what every model reads; other part types
    (image_url, input_audio, file) pass validation here and are refused by a backend that
    cannot read them."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_needs_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a content part of type 'text' needs a 'text' string")
        return self


Content = Union[str, list[ContentPart]]


class SystemMessage(_Lenient):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(_Lenient):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(_Lenient):
    role: Literal["user"]
    content: Content
    name: str | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str


class ToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Lenient):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Lenient):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[
    Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage],
    Field(discriminator="role"),
]


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


def _metadata_limits(v: dict[str, str]) -> dict[str, str]:
    if len(v) > 16 or any(len(k) > 64 or len(s) > 512 for k, s in v.items()):
        raise ValueError("metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters")
    return v


Metadata = Annotated[dict[str, str], AfterValidator(_metadata_limits)]  # OpenAI's limits, chat's and Responses'


class ChatCompletionRequest(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop_at_most_four(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if isinstance(v, list) and any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_task(cls, data: Any) -> Any:
        """A job's task is the gateway's to name (`schemas.tasks`), never a client's."""
        if isinstance(data, dict) and TASK_KEY in data:
            raise ValueError(f"Unrecognized request argument supplied: {TASK_KEY}")
        return data

    @model_validator(mode="after")
    def _coherent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs' to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def wants_cost(request: BaseModel) -> bool:
    """OpenRouter's `usage: {"include": true}` asks for the cost in the usage object (of a chat,
    legacy completions or Responses request: each keeps the fields beyond OpenAI's in
    `model_extra`)."""
    usage = (request.model_extra or {}).get("usage")
    return isinstance(usage, dict) and bool(usage.get("include"))


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; any problem becomes an InvalidRequestError naming the field."""
    return parse_body(ChatCompletionRequest, body)


def message_text(content: Content | list[dict[str, Any]] | None) -> str:
    """The text of a message: a string, or its text parts joined (parsed or as plain dicts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
        elif part.type == "text":
            texts.append(part.text or "")
    return "".join(texts)


# --- responses ------------------------------------------------------------------------


def _is_none(value: Any) -> bool:
    return value is None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(default=None, exclude_if=_is_none)
    completion_tokens_details: CompletionTokensDetails | None = Field(default=None, exclude_if=_is_none)
    cost: float | None = Field(default=None, exclude_if=_is_none)  # USD, when the request asked (OpenRouter)

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=_is_none)


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = Field(default=None, exclude_if=_is_none)
    provider: str | None = Field(default=None, exclude_if=_is_none)  # the route that served (OpenRouter's field)


class ChunkFunction(BaseModel):
    name: str | None = Field(default=None, exclude_if=_is_none)
    arguments: str | None = Field(default=None, exclude_if=_is_none)


class ChunkToolCall(BaseModel):
    index: int
    id: str | None = Field(default=None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_is_none)
    function: ChunkFunction | None = Field(default=None, exclude_if=_is_none)


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChunkToolCall] | None = Field(default=None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = Field(default=None, exclude_if=_is_none)
    provider: str | None = Field(default=None, exclude_if=_is_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def logprob_json(lp: TokenLogprob) -> dict[str, Any]:
    """A token's logprob as OpenAI's `ChatCompletionTokenLogprob`."""
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": None if lp.bytes is None else list(lp.bytes),
        "top_logprobs": [
            {"token": t.token, "logprob": t.logprob, "bytes": None if t.bytes is None else list(t.bytes)}
            for t in lp.top
        ],
    }


def tool_calls_json(fragments: Sequence[ToolCallDelta]) -> list[dict[str, Any]]:
    """A choice's tool calls, whole: each call's fragments joined (id and name from the first
    fragment that has them, the arguments concatenated in order), by call index."""
    calls: dict[int, dict[str, Any]] = {}
    for f in fragments:
        call = calls.setdefault(f.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = call["id"] or f.id
        call["function"]["name"] = call["function"]["name"] or f.name
        call["function"]["arguments"] += f.arguments
    return [calls[i] for i in sorted(calls)]
