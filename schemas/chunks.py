"""Chat completion chunks, serialised fast: `ChunkEncoder` writes a streamed completion's SSE
payloads from a per-stream prefix instead of a pydantic model per chunk. Their shapes are
`schemas.chat.ChatCompletionChunk`'s (the tests check every one against it and OpenAI's
published schema)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from schemas.chat import Usage, logprob_json
from schemas.events import Piece, TokenLogprob, ToolCallDelta


def _fragment_json(f: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": f.index}
    if f.id:
        out["id"] = f.id
    if f.id or f.name:
        out["type"] = "function"
    function: dict[str, str] = {"name": f.name} if f.name else {}
    if f.arguments or f.id or f.name:
        function["arguments"] = f.arguments
    if function:
        out["function"] = function
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ChunkEncoder:
    """Serialises the chunks of one streamed completion, fast.

    A stream sends many small chunks, so their JSON is assembled from a per-stream prefix
    instead of building a pydantic model per chunk; the tests check every shape it makes
    against `ChatCompletionChunk` and OpenAI's published schema. A tool-call fragment is a
    chunk of its own, in the order it came (`tool_call`), so a client sees each call's id and
    name first and its arguments piece by piece, exactly as the model (or upstream) wrote them.
    """

    def __init__(self, *, id: str, created: int, model: str, include_usage: bool, provider: str = "") -> None:
        fields: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
        if provider:
            fields["provider"] = provider
        head = json.dumps(fields, separators=(",", ":"))
        usage = ',"usage":null' if include_usage else ""
        self._prefix = head[:-1] + usage + ',"choices":['
        self._bare = head[:-1] + ',"choices":[],"usage":'
        self._started: set[int] = set()

    def _role(self, index: int) -> str:
        role = "" if index in self._started else '"role":"assistant",'
        self._started.add(index)
        return role

    @staticmethod
    def _logprobs(logprobs: Sequence[TokenLogprob]) -> str:
        if not logprobs:
            return "null"
        return '{"content":' + _dumps([logprob_json(lp) for lp in logprobs]) + ',"refusal":null}'

    def content(self, index: int, text: str, logprobs: Sequence[TokenLogprob] = ()) -> str:
        return (
            f'{self._prefix}{{"index":{index},"delta":{{{self._role(index)}"content":{json.dumps(text)}}},'
            f'"logprobs":{self._logprobs(logprobs)},"finish_reason":null}}]}}'
        )

    def tool_call(self, index: int, fragment: ToolCallDelta) -> str:
        role = self._role(index)
        if role:
            role += '"content":null,'
        return (
            f'{self._prefix}{{"index":{index},"delta":{{{role}"tool_calls":[{_dumps(_fragment_json(fragment))}]}},'
            f'"logprobs":null,"finish_reason":null}}]}}'
        )

    def piece(self, piece: Piece) -> list[str]:
        """A piece's chunks: its text (with its logprobs), then each tool-call fragment."""
        out = []
        if piece.text or piece.text_logprobs:
            out.append(self.content(piece.index, piece.text, piece.text_logprobs))
        out.extend(self.tool_call(piece.index, f) for f in piece.tool_calls)
        return out

    def finish(self, index: int, reason: str) -> str:
        role = "" if index in self._started else '"role":"assistant","content":""'
        self._started.add(index)
        return (
            f'{self._prefix}{{"index":{index},"delta":{{{role}}},"logprobs":null,'
            f'"finish_reason":{json.dumps(reason)}}}]}}'
        )

    def usage(self, usage: Usage) -> str:
        return self._bare + usage.model_dump_json() + "}"
