"""A finished answer as the response cache and idempotency replays keep it (shared by every
gateway through NATS KV): what each choice said and how it ended, and what it cost.

Each choice keeps its text, its tool-call fragments in the order they came and its logprobs,
so a replay (whole or streamed) gives the client what the first answer gave; an embedding
job's answer keeps its vectors. `model` and `route` name what served the first answer (a
`models` fallback list may have chosen another model than the one asked first).

Encoded compatibly: the fields added after the first version are optional keys, so an
answer written by an older gateway reads as one without tool calls, logprobs or vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.codec import WireError, need, pack, unpack
from schemas.events import TokenLogprob, ToolCallDelta, float32_vector


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    texts: list[str]
    finish: list[str]
    prompt_tokens: int
    completion_tokens: int
    cost: float
    tool_calls: list[tuple[ToolCallDelta, ...]] = field(default_factory=list)  # per choice, [] = none
    logprobs: list[tuple[TokenLogprob, ...]] = field(default_factory=list)  # per choice, [] = none
    vectors: list[bytes] = field(default_factory=list)  # an embedding job's, per input (float32)
    model: str = ""
    route: str = ""

    def calls_of(self, index: int) -> tuple[ToolCallDelta, ...]:
        return self.tool_calls[index] if index < len(self.tool_calls) else ()

    def logprobs_of(self, index: int) -> tuple[TokenLogprob, ...]:
        return self.logprobs[index] if index < len(self.logprobs) else ()

    def encode(self) -> bytes:
        o: dict[str, Any] = {
            "t": self.texts,
            "f": self.finish,
            "pt": self.prompt_tokens,
            "ct": self.completion_tokens,
            "c": self.cost,
        }
        if any(self.tool_calls):
            o["tc"] = [[c.pack() for c in calls] for calls in self.tool_calls]
        if any(self.logprobs):
            o["lp"] = [[lp.pack() for lp in lps] for lps in self.logprobs]
        if self.vectors:
            o["vec"] = self.vectors
        if self.model:
            o["m"] = self.model
        if self.route:
            o["r"] = self.route
        return pack(o)

    @classmethod
    def decode(cls, data: bytes) -> CachedAnswer:
        o = unpack(data)
        try:
            return cls(
                [str(t) for t in need(o, "t")],
                [str(f) for f in need(o, "f")],
                int(need(o, "pt")),
                int(need(o, "ct")),
                float(o.get("c", 0.0)),
                tool_calls=[tuple(ToolCallDelta.unpack(c) for c in calls) for calls in o.get("tc", ())],
                logprobs=[tuple(TokenLogprob.unpack(lp) for lp in lps) for lps in o.get("lp", ())],
                vectors=[float32_vector(v) for v in o.get("vec", ())],
                model=str(o.get("m", "")),
                route=str(o.get("r", "")),
            )
        except (TypeError, ValueError) as e:
            raise WireError(f"bad cached answer: {e}") from e
