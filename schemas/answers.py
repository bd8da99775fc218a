"""A finished answer as the response cache and idempotency replays keep it (shared by every
gateway through NATS KV): what each choice said and how it ended, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.codec import WireError, need, pack, unpack


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    texts: list[str]
    finish: list[str]
    prompt_tokens: int
    completion_tokens: int
    cost: float

    def encode(self) -> bytes:
        return pack(
            {"t": self.texts, "f": self.finish, "pt": self.prompt_tokens, "ct": self.completion_tokens, "c": self.cost}
        )

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
            )
        except (TypeError, ValueError) as e:
            raise WireError(f"bad cached answer: {e}") from e
