"""OpenAI's legacy completions shapes (`/v1/completions`): the request we accept and the
responses and chunks we send.

Reference: OpenAI's published OpenAPI spec (`CreateCompletionRequest`,
`CreateCompletionResponse`). `prompt` is a string or a list of strings (token-id prompts are
refused: no route here takes them as ids); `logprobs` is the number of alternatives per token
(0-5), as the legacy API has it; `max_tokens` defaults to 16, as at OpenAI. Requests keep
unknown fields, as chat requests do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.chat import StreamOptions, Usage
from schemas.tasks import TASK_KEY
from schemas.validation import parse_body

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=0, le=20)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _plain_prompts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if TASK_KEY in data:
                raise ValueError(f"Unrecognized request argument supplied: {TASK_KEY}")
            prompt = data.get("prompt")
            if isinstance(prompt, list) and any(not isinstance(p, str) for p in prompt):
                raise ValueError("prompt must be a string or a list of strings (token ids are not supported)")
        return data

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must hold at least one string")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_at_most_four(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or any(s == "" for s in v)):
            raise ValueError("at most 4 stop sequences are allowed, none of them empty")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        if self.best_of is not None and self.best_of > 1 and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def parse_completion_request(body: Any) -> CompletionRequest:
    return parse_body(CompletionRequest, body)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "content_filter"]


def _is_none(value: Any) -> bool:
    return value is None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_is_none)
    provider: str | None = Field(default=None, exclude_if=_is_none)  # the route that served
