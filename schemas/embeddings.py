"""OpenAI's embeddings shapes (`/v1/embeddings`): the request we accept and the list we send.

Reference: OpenAI's published OpenAPI spec (`CreateEmbeddingRequest`,
`CreateEmbeddingResponse`, `Embedding`). `input` is a string or up to `MAX_INPUTS` strings
(token-id inputs are refused); `encoding_format` `float` gives JSON numbers, `base64` the
float32 little-endian bytes (what the official SDKs ask for by default).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.tasks import TASK_KEY
from schemas.validation import parse_body

MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _plain_inputs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if TASK_KEY in data:
                raise ValueError(f"Unrecognized request argument supplied: {TASK_KEY}")
            given = data.get("input")
            if isinstance(given, list):
                if not given or len(given) > MAX_INPUTS:
                    raise ValueError(f"input must hold 1 to {MAX_INPUTS} strings")
                if any(not isinstance(t, str) for t in given):
                    raise ValueError("input must be a string or a list of strings (token ids are not supported)")
        return data

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    return parse_body(EmbeddingRequest, body)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of float32 little-endian


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


def _is_none(value: Any) -> bool:
    return value is None


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    provider: str | None = Field(default=None, exclude_if=_is_none)  # the route that served
