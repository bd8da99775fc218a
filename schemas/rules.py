"""Rules more than one role applies, as pure functions, so each is written once.

- `estimate_prompt_tokens`: a tokenizer-free estimate of a chat request's prompt (for
  reservations, and for requests that end before a worker counted the prompt);
  `estimate_request_prompt` the same for a job of any task;
- `check_max_tokens`: a request may not ask for more completion tokens than its key's or its
  org's cap (the gateway refuses it before admission; the scheduler checks it again);
- `lane_eligible`: whether a submission could be placed through a lane at all (the scheduler adds
  what only it knows when it grants one: see `scheduler.service`, "Lanes").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from schemas.chat import message_text
from schemas.errors import InvalidRequestError
from schemas.jobs import Submission
from schemas.tasks import prompts, task_of
from schemas.tenancy import NO_LIMITS, Limits

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # role and framing tokens a chat template adds around each message
TOKENS_PER_PROMPT = 1  # a raw prompt has no template framing: a begin-of-text token at most


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """~4 characters a token plus 4 tokens of framing a message: an upper-ish estimate."""
    chars = count = 0
    for m in messages:
        chars += len(message_text(m.get("content")))
        count += 1
    return chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * count


def estimate_request_prompt(request: Mapping[str, Any]) -> int:
    """`estimate_prompt_tokens` for a job's request of any task (`schemas.tasks`): a chat's
    messages, a completion's prompts or an embedding job's inputs."""
    if task_of(request) == "chat":
        return estimate_prompt_tokens(request.get("messages") or ())
    return sum(len(p) // CHARS_PER_TOKEN + TOKENS_PER_PROMPT for p in prompts(request))


def requested_max_tokens(request: Mapping[str, Any]) -> int | None:
    """The completion budget a request asks for (`max_completion_tokens` wins, as at OpenAI)."""
    asked = request.get("max_completion_tokens") or request.get("max_tokens")
    return asked if isinstance(asked, int) and not isinstance(asked, bool) else None


def check_max_tokens(request: Mapping[str, Any], key_limits: Limits, org_limits: Limits) -> None:
    """Refuse (400, param max_tokens) a request asking more than the key's or the org's cap."""
    asked = requested_max_tokens(request) or 0
    for limits, who in ((key_limits, "this API key"), (org_limits, "this organization")):
        if limits.max_tokens and asked > limits.max_tokens:
            raise InvalidRequestError(
                f"max_tokens is {asked}, more than the {limits.max_tokens} allowed for {who}.",
                param="max_tokens",
                code="max_tokens_exceeded",
            )


def lane_eligible(sub: Submission) -> bool:
    """Nothing about this submission needs a scheduler's eye: a first placement of a key and an
    org with no counted limits, with no `provider` preferences or `models` fallback list."""
    job = sub.job
    return (
        job.dispatch == 1
        and not sub.avoid
        and sub.key_limits == NO_LIMITS
        and sub.org_limits == NO_LIMITS
        and "provider" not in job.request
        and "models" not in job.request
    )
