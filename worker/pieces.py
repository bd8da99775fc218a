"""A choice's output as `Piece`s, each generated token's logprob on the piece its token became.

The text pipeline (`worker.engine_text`) turns tokens into text and tool-call fragments, but not
one for one: a token may be held back (it may start a marker, or end in half a character) and
come out steps later, as text or as a call's markup. OpenAI's `logprobs.content` lists the
message's text tokens only, in order, once each (what `Piece.text_logprobs` keeps). So `Places`
remembers which characters each token fed the pipeline and, as the pipeline settles them (these
input spans went out as text, the rest before its horizon is markup), puts a text token's
logprob on the text piece holding its first text character and a markup token's on a call
piece. A token none of whose characters reached the parser (cut with a stop sequence, or an
incomplete character at the end) stays with the text, as it did before tools.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.events import Piece, TokenLogprob
from worker.toolcalls import Output

Span = tuple[int, int]  # input positions: start, end


def pieces(index: int, out: Output, tokens: int, logprobs: Sequence[Sequence[TokenLogprob]] = ()) -> list[Piece]:
    """A choice's output as Pieces, in order: runs of text, runs of call fragments, each with the
    logprobs of its items (`logprobs[i]` are `out[i]`'s, when given). The first carries the token
    count (of the tokens that produced all of it)."""
    result: list[Piece] = []
    for i, item in enumerate(out):
        lps = tuple(logprobs[i]) if logprobs else ()
        last = result[-1] if result else None
        if isinstance(item, str):
            if last is not None and not last.tool_calls:
                result[-1] = Piece(index, last.text + item, last.tokens, (), last.logprobs + lps)
            else:
                result.append(Piece(index, item, logprobs=lps))
        elif last is not None and last.tool_calls and not last.text:
            result[-1] = Piece(index, "", last.tokens, (*last.tool_calls, item), last.logprobs + lps)
        else:
            result.append(Piece(index, tool_calls=(item,), logprobs=lps))
    if not result:
        if not tokens:
            return []
        result.append(Piece(index))
    first = result[0]
    result[0] = Piece(index, first.text, tokens, first.tool_calls, first.logprobs)
    return result


@dataclass(frozen=True, slots=True)
class _Token:
    start: int  # the characters it fed the pipeline: [start, end)
    end: int
    logprob: TokenLogprob


class Places:
    """Where each token's logprob goes (see the module docstring): told what each token fed the
    pipeline (`fed`), then, with each output, what the pipeline settled (`pieces`)."""

    __slots__ = ("_fed", "_waiting", "_tokens", "_markup")

    def __init__(self) -> None:
        self._fed = 0  # characters fed to the pipeline
        self._waiting: list[TokenLogprob] = []  # tokens that fed nothing yet: the decoder holds their bytes
        self._tokens: deque[_Token] = deque()  # fed, not yet placed
        self._markup: list[TokenLogprob] = []  # markup tokens' logprobs, waiting for a call piece

    def fed(self, chars: int, logprob: TokenLogprob | None = None) -> None:
        """The next `chars` characters of the pipeline's input came from this token (with
        `logprob`), and from the tokens before it that fed none: they make characters together."""
        if logprob is not None:
            self._waiting.append(logprob)
        if chars and self._waiting:
            self._tokens.extend(_Token(self._fed, self._fed + chars, lp) for lp in self._waiting)
            self._waiting = []
        self._fed += chars

    def pieces(
        self, index: int, out: Output, tokens: int, runs: Sequence[Span], settled: int, *, final: bool
    ) -> list[Piece]:
        """`out` as pieces with the logprobs of the tokens now placed. `runs`: the input spans
        that went out as text in `out` (in order); `settled`: the input before it is text or
        markup for good; `final`: the output is over (every token is placed)."""
        logprobs: list[list[TokenLogprob]] = [[] for _ in out]
        texts = [i for i, item in enumerate(out) if isinstance(item, str)]
        loose = self._place(out, texts, logprobs, runs, settled, final=final)
        if loose:  # with the text (the last of it, or a piece of its own)
            if texts:
                logprobs[texts[-1]].extend(loose)
            else:
                out, logprobs = [*out, ""], [*logprobs, loose]
        calls = [i for i, item in enumerate(out) if not isinstance(item, str)]
        if calls:
            logprobs[calls[0]][:0] = self._markup
            self._markup = []
        elif final:
            self._markup = []  # markup after the last fragment (a closing tag): no client sees it
        return pieces(index, out, tokens, logprobs)

    def _place(
        self,
        out: Output,
        texts: list[int],
        logprobs: list[list[TokenLogprob]],
        runs: Sequence[Span],
        settled: int,
        *,
        final: bool,
    ) -> list[TokenLogprob]:
        """Put each token that is decided on its text item (or among the markup); return the
        text tokens that have no character in `out`."""
        ends = []  # each text item's end, counted in text characters
        total = 0
        for item in out:
            if isinstance(item, str):
                total += len(item)
                ends.append(total)
        loose: list[TokenLogprob] = []
        run, before, at = 0, 0, 0  # the first run not wholly before the token; text characters before it
        while self._tokens:
            token = self._tokens[0]
            while run < len(runs) and runs[run][1] <= token.start:
                before += runs[run][1] - runs[run][0]
                run += 1
            if run < len(runs) and runs[run][0] < token.end:  # a character of it went out as text
                ordinal = before + max(token.start, runs[run][0]) - runs[run][0]
                while at < len(ends) - 1 and ordinal >= ends[at]:
                    at += 1
                (logprobs[texts[at]] if texts else loose).append(token.logprob)
            elif token.end <= settled:
                self._markup.append(token.logprob)
            elif final:
                loose.append(token.logprob)
            else:
                break  # held: it and every token after it may still go either way
            self._tokens.popleft()
        if final:
            loose.extend(self._waiting)
            self._waiting = []
        return loose
