"""What the gateway relayed from a job: each choice's text, tool-call fragments and logprobs,
and the tokens they hold. The basis of the answer a client gets and of what it is billed.

Only the winning attempt's pieces are kept; after a continuation (`carry_on`) the next
attempt's pieces extend the same choices, and `carried` remembers how many tokens came before
it. Nothing here knows any API's JSON: `broker_api.chat_shape` turns an output into
chat-completions responses, `broker_api.billing` into a charge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.answers import CachedAnswer
from schemas.events import Delta, Done, Piece, TokenLogprob, ToolCallDelta


@dataclass(slots=True)
class ChoiceOutput:
    """One choice as relayed so far, its pieces merged in order (an embedding job's choice is
    one input's vector)."""

    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    embedding: bytes = b""

    def add(self, piece: Piece) -> None:
        if piece.embedding:
            self.embedding = piece.embedding
        if piece.text:
            self.text.append(piece.text)
        if piece.tool_calls:
            self.tool_calls.extend(piece.tool_calls)
        self.logprobs.extend(piece.text_logprobs)


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    """A finished choice, whichever way it was produced (run now, or from the cache)."""

    text: str
    finish: str
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    embedding: bytes = b""


@dataclass(slots=True)
class Output:
    choices: int
    attempt: int = -1  # the attempt whose pieces are kept; -1 until one sent any
    parts: list[ChoiceOutput] = field(default_factory=list)
    tokens: int = 0  # generated tokens relayed, all attempts that carried the answer
    chars: int = 0
    carried: int = 0  # tokens relayed before the current attempt continued the answer
    continuing: bool = False

    def __post_init__(self) -> None:
        self.parts = [ChoiceOutput() for _ in range(self.choices)]

    def _reset(self, attempt: int) -> None:
        self.attempt, self.tokens, self.chars = attempt, 0, 0
        self.parts = [ChoiceOutput() for _ in range(self.choices)]

    def carry_on(self) -> None:
        """The next attempt continues this output rather than replacing it."""
        self.continuing, self.carried = True, self.tokens

    def add(self, ev: Delta | Done) -> None:
        if ev.attempt != self.attempt:
            if self.continuing:
                self.attempt, self.continuing = ev.attempt, False
            else:
                self._reset(ev.attempt)
        for piece in ev.pieces:
            if not 0 <= piece.index < self.choices:  # a worker's mistake: no such choice to add to
                continue
            self.parts[piece.index].add(piece)
            self.tokens += piece.tokens
            self.chars += len(piece.text)

    def text(self, index: int) -> str:
        return "".join(self.parts[index].text)

    def results(self, done: Done) -> list[ChoiceResult]:
        return [
            ChoiceResult(
                "".join(part.text),
                done.finish[i] if i < len(done.finish) else "stop",
                tuple(part.tool_calls),
                tuple(part.logprobs),
                part.embedding,
            )
            for i, part in enumerate(self.parts)
        ]


def answer_pieces(results: list[ChoiceResult]) -> list[Piece]:
    """A finished answer as the pieces a stream relays: each choice's text with its logprobs,
    then its tool-call fragments (so a stored answer streams through the same encoding as a
    running one)."""
    out = []
    for i, r in enumerate(results):
        out.append(Piece(i, r.text, 0, (), r.logprobs))
        if r.tool_calls:
            out.append(Piece(i, "", 0, r.tool_calls))
    return out


def cached_results(answer: CachedAnswer, choices: int) -> list[ChoiceResult]:
    """A stored answer's choices (as many as asked: a stored answer has them all)."""
    return [
        ChoiceResult(
            answer.texts[i] if i < len(answer.texts) else "",
            answer.finish[i] if i < len(answer.finish) else "stop",
            answer.calls_of(i),
            answer.logprobs_of(i),
            answer.vectors[i] if i < len(answer.vectors) else b"",
        )
        for i in range(choices)
    ]
