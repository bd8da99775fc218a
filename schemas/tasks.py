"""What a job asks its worker to do, and the facts every role reads off a job's request.

A job's request is an OpenAI-shaped body. Chat completions' is the default and carries no task;
the gateway's translations of the other APIs name theirs under `TASK_KEY`, a key only the
gateway sets (a chat request that carries it is refused as an unknown parameter):

    chat         messages, tools, ...     as the client sent it
    completion   prompt: [str, ...]       raw text: no chat template; `len(prompt) * n` choices,
                                          choice `p * n + j` is the j-th answer to prompt p
    embedding    input: [str, ...]        one vector per input (`Piece.embedding`, index = the
                                          input's position); `encoding_format`, `dimensions`

`choices` and `prompts` read any of them (and `schemas.rules.estimate_request_prompt` estimates
its prompt), so a worker, a scheduler or the gateway never looks for `messages` in a request
that has none. Pure: imports nothing of schemas, so every schemas module may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Task = Literal["chat", "completion", "embedding"]
TASKS: frozenset[str] = frozenset({"chat", "completion", "embedding"})
TASK_KEY = "tokenyard_task"


def task_of(request: Mapping[str, Any]) -> Task:
    task = request.get(TASK_KEY, "chat")
    return task if task in TASKS else "chat"  # type: ignore[return-value]


def prompts(request: Mapping[str, Any]) -> list[str]:
    """A completion's prompts, or an embedding job's inputs ([] for a chat request)."""
    task = task_of(request)
    values = request.get("prompt") if task == "completion" else request.get("input") if task == "embedding" else None
    return [str(v) for v in values] if isinstance(values, list) else []


def choices(request: Mapping[str, Any]) -> int:
    """How many answers the job gives: `n` for chat, `len(prompt) * n` for a completion, one
    vector per input for embeddings."""
    task = task_of(request)
    n = int(request.get("n") or 1)
    if task == "completion":
        return max(1, len(prompts(request))) * n
    if task == "embedding":
        return len(prompts(request))
    return n
