"""The deterministic test backend: fast, reproducible, configurable length and rate.

It answers with the words of the last user message, repeated until `tokens` words (or
`max_tokens`) have been sent; one word is one token. Prompt tokens are the words of every
message plus 3 per message. Stop sequences are honoured on the text, as a real model's are.

The last user message may shape the answer with directives in double brackets, which are not
echoed: `[[tokens=N]]` (answer length), `[[rate=R]]` (tokens/s) and `[[script]]` (below). For
tests of faults, a worker started with `--echo-directives` also obeys `[[crash]]` (the worker
process exits at once, before any token: a poison job), `[[fail]]` (a retryable error before
the first token), `[[die-after=N]]` (the process exits after N tokens of a fresh answer),
`[[hang-after=N]]` (after N tokens of a fresh answer nothing more comes while the worker stays
alive and heartbeats, like a hung upstream read) and `[[delay=S]]` (wait S seconds before the
first token, like a long prefill). Without the flag
(the default) those are plain text, echoed like any other word: any client may send them.

A trailing assistant message is continued (assistant prefill): the answer goes on from the
word after the ones it already holds.

Scripted model text (`worker.echo_script`): after a `[[script]]` directive in the last user
message, or from `--echo-script FILE`, the backend plays that text back as a model's output,
through the engine's stop and tool-call parsing, so `tools` are accepted then.

Other tasks (`schemas.tasks`): a raw-prompt completion echoes each prompt as a user message
of its own (choice `p * n + j` for prompt p); embeddings are `echo_vector(text)`, a
deterministic unit vector of `dimensions` (default 32) float32 values from the text's SHA-256,
one prompt token per word.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import ContextLengthError, WorkerFailedError
from schemas.events import FinishReason, Piece
from schemas.jobs import ModelAdvert
from schemas.tasks import TASK_KEY, prompts, task_of
from worker import echo_script
from worker.backend import Finish, Output, Sampling, Usage, chat_messages, check_text_only
from worker.engine_tools import plan_tools
from worker.settings import WorkerSettings

DEFAULT_MODEL = "tokenyard/echo"
DEFAULT_DIMENSIONS = 32
_DIRECTIVE = re.compile(r"\[\[([a-z-]+)(?:=([0-9.]+))?\]\]")
SHAPES = frozenset({"tokens", "rate", "script"})  # obeyed always: they only shape a test answer
FAULTS = frozenset({"crash", "fail", "die-after", "hang-after", "delay"})  # obeyed only with --echo-directives


@dataclass(frozen=True, slots=True)
class _Plan:
    words: list[str]
    prompt_tokens: int
    tokens: int
    rate: float
    crash: bool
    fail: bool
    die_after: int | None
    hang_after: int | None
    delay: float
    continue_from: int  # words of a trailing assistant message already given


class EchoBackend:
    def __init__(
        self,
        *,
        models: tuple[str, ...],
        slots: int,
        tokens: int,
        rate: float,
        context: int,
        script: str = "",
        tool_parser: str = "hermes",
        faults: bool = False,
    ) -> None:
        self._models = models or (DEFAULT_MODEL,)
        self._slots = slots
        self._tokens = tokens
        self._rate = rate
        self._context = context
        self._script = script  # played for every request without a [[script]] of its own
        self._format = echo_script.script_format(tool_parser)
        self._obeyed = SHAPES | FAULTS if faults else SHAPES

    @classmethod
    def from_settings(cls, s: WorkerSettings) -> EchoBackend:
        script = Path(s.echo_script).read_text(encoding="utf-8") if s.echo_script else ""
        return cls(
            models=s.models,
            slots=s.slots,
            tokens=s.echo_tokens,
            rate=s.echo_rate,
            context=s.echo_context,
            script=script,
            tool_parser=s.tool_parser,
            faults=s.echo_directives,
        )

    @property
    def slots(self) -> int:
        return self._slots

    def models(self) -> list[ModelAdvert]:
        return [ModelAdvert(m, self._context, "tokenyard", assistant_prefill=True) for m in self._models]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def check(self, model: str, request: dict[str, Any]) -> None:
        task = task_of(request)
        if task == "embedding":
            return
        if task == "completion":
            for one in _as_chats(request):
                self.check(model, one)
            return
        scripted = echo_script.script_of(request, self._script) is not None
        check_text_only(request, tools=scripted)
        if scripted:
            plan_tools(request, self._format)
        plan = self._plan(request)
        wanted = Sampling.of(request).max_tokens or plan.tokens
        if plan.prompt_tokens + wanted > self._context:
            raise ContextLengthError(
                f"This model's maximum context length is {self._context} tokens. However, you requested "
                f"{plan.prompt_tokens + wanted} tokens ({plan.prompt_tokens} in the messages, {wanted} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
            )

    async def generate(self, model: str, request: dict[str, Any]) -> AsyncIterator[Output]:
        task = task_of(request)
        if task == "embedding":
            for item in _embed(request):
                yield item
            return
        if task == "completion":  # each prompt answered as a chat of its own
            n, prompt_tokens, completion = int(request.get("n") or 1), 0, 0
            for p, one in enumerate(_as_chats(request)):
                async for item in self._chat(one):
                    if isinstance(item, Usage):
                        prompt_tokens, completion = (
                            prompt_tokens + item.prompt_tokens,
                            completion + item.completion_tokens,
                        )
                    elif isinstance(item, Piece):
                        yield dataclasses.replace(item, index=p * n + item.index)
                    else:
                        yield Finish(p * n + item.index, item.reason)
            yield Usage(prompt_tokens, completion)
            return
        async for item in self._chat(request):
            yield item

    async def _chat(self, request: dict[str, Any]) -> AsyncIterator[Output]:
        plan = self._plan(request)
        sampling = Sampling.of(request)
        if plan.crash:
            os._exit(70)
        if plan.fail:
            raise WorkerFailedError("the echo backend was asked to fail this attempt")
        if plan.delay:
            await asyncio.sleep(plan.delay)
        script = echo_script.script_of(request, self._script)
        if script is not None:
            async for item in self._play(script, request, plan):
                yield item
            return
        # A trailing assistant message is a prefix to continue (assistant prefill): the answer
        # picks up at the word after it, as if the earlier words had been generated here.
        start = plan.continue_from
        end = min(plan.tokens, start + sampling.max_tokens) if sampling.max_tokens else plan.tokens
        texts = [
            plan.words[i % len(plan.words)] if i == 0 else " " + plan.words[i % len(plan.words)]
            for i in range(start, end)
        ]
        # The whole answer is known up front, so the stop cut is exact and nothing past it leaks.
        cut = _stop_cut("".join(texts), sampling.stop)
        finish: FinishReason = "stop" if cut is not None or end >= plan.tokens else "length"
        completion = 0
        for index in range(sampling.n):
            sent = 0
            for i, text in enumerate(texts):
                if plan.die_after is not None and not start and i >= plan.die_after:
                    os._exit(71)
                if plan.hang_after is not None and not start and i >= plan.hang_after:
                    await asyncio.Event().wait()  # until the job is stopped
                if cut is not None and sent + len(text) > cut:
                    if cut > sent:
                        completion += 1
                        yield Piece(index, text[: cut - sent], 1)
                    break
                sent += len(text)
                completion += 1
                yield Piece(index, text, 1)
                if plan.rate > 0:
                    await asyncio.sleep(1.0 / plan.rate)
                elif i % 64 == 63:
                    await asyncio.sleep(0)
            yield Finish(index, finish)
        yield Usage(plan.prompt_tokens, completion)

    def healthy(self) -> bool:
        return True

    async def _play(self, script: str, request: dict[str, Any], plan: _Plan) -> AsyncIterator[Output]:
        for i, item in enumerate(echo_script.play(script, request, self._format)):
            if isinstance(item, int):
                yield Usage(plan.prompt_tokens, item)
                return
            yield item
            if plan.rate > 0:
                await asyncio.sleep(1.0 / plan.rate)
            elif i % 64 == 63:
                await asyncio.sleep(0)

    def partial_usage(self, model: str, request: dict[str, Any], completion_tokens: int) -> Usage:
        return Usage(sum(self._plan(one).prompt_tokens for one in _as_chats(request)), completion_tokens)

    def _plan(self, request: dict[str, Any]) -> _Plan:
        messages = chat_messages(request)
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        prefix = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        directives = {k: v for k, v in _DIRECTIVE.findall(last_user) if k in self._obeyed}
        words = self._strip(last_user).split() or ["ok"]
        prompt_tokens = sum(len(self._strip(m["content"]).split()) + 3 for m in messages)
        return _Plan(
            words=words,
            prompt_tokens=prompt_tokens,
            tokens=int(directives["tokens"]) if directives.get("tokens") else self._tokens,
            rate=float(directives["rate"]) if directives.get("rate") else self._rate,
            crash="crash" in directives,
            fail="fail" in directives,
            die_after=int(directives["die-after"]) if directives.get("die-after") else None,
            hang_after=int(directives["hang-after"]) if directives.get("hang-after") else None,
            delay=float(directives["delay"]) if directives.get("delay") else 0.0,
            continue_from=len(prefix.split()),
        )

    def _strip(self, text: str) -> str:
        """The text without the directives this worker obeys."""
        return _DIRECTIVE.sub(lambda m: " " if m.group(1) in self._obeyed else m.group(0), text)


def _as_chats(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A completion's prompts as one chat request each (a chat request as itself)."""
    if task_of(request) != "completion":
        return [request]
    rest = {k: v for k, v in request.items() if k not in {TASK_KEY, "prompt"}}
    return [{**rest, "messages": [{"role": "user", "content": p}]} for p in prompts(request) or [""]]


def echo_vector(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> bytes:
    """The echo backend's embedding of a text: a unit vector, float32 little-endian."""
    raw: list[float] = []
    block = 0
    while len(raw) < dimensions:
        digest = hashlib.sha256(f"{block}:{text}".encode()).digest()
        raw.extend((b - 127.5) / 127.5 for b in digest)
        block += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return struct.pack(f"<{dimensions}f", *(v / norm for v in raw))


def _embed(request: dict[str, Any]) -> list[Output]:
    texts = prompts(request)
    dimensions = int(request.get("dimensions") or DEFAULT_DIMENSIONS)
    out: list[Output] = [Piece(i, embedding=echo_vector(t, dimensions)) for i, t in enumerate(texts)]
    out.extend(Finish(i, "stop") for i in range(len(texts)))
    out.append(Usage(sum(max(1, len(t.split())) for t in texts), 0))
    return out


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the text must end if a stop sequence appears in it, else None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
