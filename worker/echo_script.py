"""Scripted model text for the echo backend: play given text back as if a model generated it.

For end-to-end tests of what the engine does with a model's text (tool-call markup above all):
the text goes out token by token through the same `TextPipeline` (stop sequences, then the
tool-call parser) as the transformers engine's, so a test can drive `<tool_call>...</tool_call>`
through the real parser and check what reaches the client.

Where the text comes from: everything after a `[[script]]` directive in the last user message,
else the worker's `--echo-script FILE`. The markup is parsed when the request has tools (and
`tool_choice` is not "none"), in the worker's `--tool-parser` format (hermes by default).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from schemas.chat import message_text
from schemas.events import FinishReason, Piece
from worker.backend import Finish, Sampling
from worker.engine_text import TextPipeline
from worker.engine_tools import plan_tools
from worker.pieces import pieces
from worker.toolcalls import Output, ToolCallParser
from worker.toolformats import FORMATS, Format

DIRECTIVE = "[[script]]"
# Tokens as a BPE tokenizer would cut them: words of up to 6 letters, single punctuation, runs of
# whitespace. So markup such as <tool_call> arrives split over several tokens.
_TOKEN = re.compile(r"\s+|\w{1,6}|[^\w\s]")


def script_of(request: dict[str, Any], default: str) -> str | None:
    """The model text to play for this request, or None to echo as usual."""
    last_user = next((m for m in reversed(request["messages"]) if m.get("role") == "user"), None)
    text = message_text(last_user.get("content")) if last_user else ""
    at = text.find(DIRECTIVE)
    if at >= 0:
        return text[at + len(DIRECTIVE) :]
    return default or None


def script_format(setting: str) -> Format:
    return FORMATS.get(setting, FORMATS["hermes"])


def tokens_of(text: str) -> list[str]:
    return _TOKEN.findall(text)


def play(script: str, request: dict[str, Any], fmt: Format) -> Iterator[Piece | Finish | int]:
    """Pieces and Finishes for every choice, then the number of tokens played (an int)."""
    sampling = Sampling.of(request)
    tools = plan_tools(request, fmt)
    tokens = tokens_of(script)
    limit = min(len(tokens), sampling.max_tokens) if sampling.max_tokens else len(tokens)
    played = 0
    for index in range(sampling.n):
        parser = ToolCallParser(tools.fmt, names=tools.names, max_calls=tools.max_calls) if tools.fmt else None
        pipeline = TextPipeline(sampling.stop, parser)
        reason: FinishReason = "stop"
        pending = 0
        out: Output = []
        for token in tokens[:limit]:
            played += 1
            pending += 1
            out = pipeline.push(token)
            if pipeline.stopped or pipeline.spent:
                reason = "stop" if pipeline.stopped else "tool_calls"
                break
            if out:
                yield from pieces(index, out, pending)
                pending, out = 0, []
        else:
            reason = "length" if limit < len(tokens) else "stop"
        yield from pieces(index, [*out, *pipeline.finish(length=reason == "length")], pending)
        yield Finish(index, "tool_calls" if reason == "stop" and pipeline.calls else reason)
    yield played
