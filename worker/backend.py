"""The interface every backend implements, and what it yields.

A backend turns one job's OpenAI request into text (and tool calls, logprobs). The runtime (`worker.runtime`) owns
everything else: pulling, heartbeats, coalescing, sequence numbers, cancellation, acks.

Contract:
- `check(request)` runs before anything is sent: raise an `InvalidRequestError` (or a subclass
  such as `ContextLengthError`, `UnsupportedError`) for a request this backend cannot serve;
  it reaches the client as an HTTP 400.
- `generate(request)` is an async iterator of `Piece` (`schemas.events`) and `Finish` items for choices
  `0 .. n-1`, ending with exactly one `Usage`. Token counts are exact.
- The runtime cancels a generation by closing the iterator (client gone, another attempt
  won, shutdown): a backend frees the sequence's slot in a `finally`. When the gateway asked
  for the stop, the runtime then reports `partial_usage`: the prompt as this backend counts
  it, the tokens `generate` had yielded, and their cost, so a cancelled request is billed too.
- Any other exception fails the attempt; a `TokenyardError` crosses to the gateway as is,
  anything else as a retryable server error (another worker or pool may succeed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, Union

from schemas.chat import message_text
from schemas.errors import UnsupportedError
from schemas.events import FinishReason, Piece
from schemas.jobs import ModelAdvert


@dataclass(frozen=True, slots=True)
class Finish:
    index: int
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cost: float | None = None  # USD, where the backend has a price table (cloud adapters)


Output = Union[Piece, Finish, Usage]


@dataclass(frozen=True, slots=True)
class Sampling:
    """The sampling parameters of an OpenAI request, with OpenAI's defaults filled in."""

    n: int
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    presence_penalty: float
    frequency_penalty: float
    logprobs: int = -1  # -1: not asked for; else how many alternatives per token (top_logprobs)

    @classmethod
    def of(cls, request: dict[str, Any]) -> Sampling:
        stop = request.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(
            n=int(request.get("n") or 1),
            max_tokens=request.get("max_completion_tokens") or request.get("max_tokens"),
            temperature=_number(request.get("temperature"), 1.0),
            top_p=_number(request.get("top_p"), 1.0),
            seed=request.get("seed"),
            stop=stops,
            presence_penalty=_number(request.get("presence_penalty"), 0.0),
            frequency_penalty=_number(request.get("frequency_penalty"), 0.0),
            logprobs=int(request.get("top_logprobs") or 0) if request.get("logprobs") else -1,
        )


def _number(value: Any, default: float) -> float:
    return default if value is None else float(value)


def chat_messages(request: dict[str, Any]) -> list[dict[str, str]]:
    """The request's messages as plain {role, content} text, for a chat template."""
    return [{"role": m["role"], "content": message_text(m.get("content"))} for m in request.get("messages") or ()]


class Backend(Protocol):
    """See the module docstring."""

    @property
    def slots(self) -> int:
        """How many jobs this backend runs at once (the worker advertises free ones)."""
        ...

    def models(self) -> list[ModelAdvert]:
        """The public model ids this backend serves."""
        ...

    async def start(self) -> None:
        """Load models, open connections. Heavy work goes off the event loop."""
        ...

    async def close(self) -> None: ...

    def check(self, model: str, request: dict[str, Any]) -> None: ...

    def generate(self, model: str, request: dict[str, Any]) -> AsyncIterator[Output]: ...

    def healthy(self) -> bool:
        """False: up, but it should get no new jobs (a cloud adapter whose provider is down)."""
        ...

    def partial_usage(self, model: str, request: dict[str, Any], completion_tokens: int) -> Usage:
        """What a generation stopped after `completion_tokens` tokens used: the prompt (exact
        where this backend can count it), those tokens, and the cost at this route's prices."""
        ...


def check_text_only(
    request: dict[str, Any], *, tools: bool = False, response_format: bool = False, logprobs: bool = False
) -> None:
    """Refuse what a plain text-generation model cannot do, with a 400 naming the parameter.

    Shared by backends that run a model locally (echo, transformers); a cloud adapter forwards
    these to its upstream instead. A backend that can serve `tools`, `response_format` or
    `logprobs` itself says so (the transformers engine then decides by the model's template).
    """
    if not tools and request.get("tools") and request.get("tool_choice") != "none":
        raise UnsupportedError("This model does not support tools.", param="tools")
    fmt = (request.get("response_format") or {}).get("type", "text")
    if not response_format and fmt != "text":
        raise UnsupportedError(
            f"response_format of type '{fmt}' is not supported by this model.",
            param="response_format",
            code="unsupported_value",
        )
    if not logprobs and request.get("logprobs"):
        raise UnsupportedError("logprobs are not supported by this model.", param="logprobs")
    if request.get("suffix"):  # a completion's insertion point: no local model here is trained for it
        raise UnsupportedError("suffix is not supported by this model.", param="suffix")
    for i, m in enumerate(request.get("messages") or ()):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") != "text":
                    raise UnsupportedError(
                        f"Content parts of type '{part.get('type')}' are not supported by this model.",
                        param=f"messages[{i}].content[{j}]",
                        code="unsupported_value",
                    )
