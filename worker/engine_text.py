"""Incremental detokenization: token ids in, clean text out, one token at a time.

Decoding tokens one by one breaks multi-byte characters (a UTF-8 character split over two
byte-level tokens) and drops the leading spaces some tokenizers attach to word pieces. So, as in
vLLM and TGI, each new token is decoded together with a few tokens before it, and text is only
released once it no longer ends in a replacement character. Then stop sequences are cut and
tool-call markup parsed (`TextPipeline`): what comes out is text and tool-call fragments, as
pieces with each token's logprob on the piece its token became (`worker.pieces`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from schemas.events import Piece, TokenLogprob, TopLogprob
from worker.pieces import Places, Span
from worker.stops import StopScanner
from worker.toolcalls import Output, ToolCallParser

Decode = Callable[[list[int]], str]
Describe = Callable[[int], tuple[str, bytes]]  # a token's text and bytes
Found = tuple[int, float, list[tuple[int, float]]]  # a sampled token, its logprob, the top alternatives

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas."""

    __slots__ = ("_decode", "_ids", "_prefix", "_read")

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window re-decoded with each token
        self._read = 0  # ids before this have been released as text

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is left at the end, even an incomplete character."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            if final:
                self._read = len(self._ids)
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


class TextPipeline:
    """What happens to a choice's text once decoded: stop sequences are cut, then tool-call
    markup is parsed (where the request has tools). Pure: the echo backend's scripted text runs
    through it as well as the engine's."""

    __slots__ = ("_stops", "_parser", "_passed", "_runs")

    def __init__(self, stops: tuple[str, ...], parser: ToolCallParser | None = None) -> None:
        self._stops = StopScanner(stops)
        self._parser = parser
        self._passed = 0  # characters past the stop scanner (without a parser: all text)
        self._runs: list[Span] = []

    @property
    def settled(self) -> int:
        """The input before this is text or markup for good (see `ToolCallParser.settled`); the
        stop scanner's output is its input's prefix, so the positions are the same."""
        return self._parser.settled if self._parser is not None else self._passed

    def take_runs(self) -> list[Span]:
        """The input spans that went out as text since the last call."""
        if self._parser is not None:
            return self._parser.take_runs()
        runs, self._runs = self._runs, []
        return runs

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def spent(self) -> bool:
        """The request's limit of tool calls is reached."""
        return self._parser is not None and self._parser.spent

    @property
    def calls(self) -> int:
        return self._parser.calls if self._parser is not None else 0

    def push(self, text: str) -> Output:
        return self._parse(self._stops.push(text))

    def finish(self, text: str = "", *, length: bool = False) -> Output:
        """The generation ended; `length`: max_tokens cut it (`ToolCallParser.finish`)."""
        out = self._parse(self._stops.push(text) + self._stops.flush())
        if self._parser is not None:
            out.extend(self._parser.finish(length=length))
        return out

    def _parse(self, text: str) -> Output:
        if self._parser is not None:
            return self._parser.push(text) if text else []
        if not text:
            return []
        self._runs.append((self._passed, self._passed + len(text)))
        self._passed += len(text)
        return [text]


class TextStream:
    """A sequence's text pipeline: detokenize, then `TextPipeline` (stops, tool calls).

    Also counts the tokens whose output has not gone out yet, so every token is accounted for in
    exactly one piece, and places their logprobs (`worker.pieces.Places`). `markup` maps special
    tokens that are tool-call markup to their text: decoding skips special tokens, so these
    reach the parser this way.
    """

    __slots__ = ("_decoder", "_pipeline", "_markup", "_places", "_final", "pending_tokens")

    def __init__(
        self,
        decode: Decode,
        stops: tuple[str, ...],
        *,
        parser: ToolCallParser | None = None,
        markup: Mapping[int, str] | None = None,
    ) -> None:
        self._decoder = IncrementalDecoder(decode)
        self._pipeline = TextPipeline(stops, parser)
        self._markup = markup or {}
        self._places = Places()
        self._final = False
        self.pending_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._pipeline.stopped

    @property
    def spent(self) -> bool:
        return self._pipeline.spent

    @property
    def calls(self) -> int:
        return self._pipeline.calls

    def push(self, token: int, logprob: TokenLogprob | None = None) -> Output:
        self.pending_tokens += 1
        if token in self._markup:
            held, marker = self._decoder.flush(), self._markup[token]
            self._places.fed(len(held))  # the bytes before it are theirs, not the marker's
            self._places.fed(len(marker), logprob)
            return self._pipeline.push(held + marker)
        text = self._decoder.push(token)
        self._places.fed(len(text), logprob)
        return self._pipeline.push(text)

    def count_only(self) -> None:
        """A token that produces no text (end of sequence) but is still generated."""
        self.pending_tokens += 1

    def finish(self, *, length: bool = False) -> Output:
        held = self._decoder.flush()
        self._places.fed(len(held))
        self._final = True
        return self._pipeline.finish(held, length=length)

    def take_tokens(self) -> int:
        n, self.pending_tokens = self.pending_tokens, 0
        return n

    def pieces(self, index: int, out: Output) -> list[Piece]:
        """`out` (what `push` and `finish` returned since the last call) as choice `index`'s
        pieces: the pending token count on the first, each logprob on its own token's piece."""
        pipeline = self._pipeline
        runs = pipeline.take_runs()
        return self._places.pieces(index, out, self.take_tokens(), runs, pipeline.settled, final=self._final)


def token_logprob(found: Found, describe: Describe) -> TokenLogprob:
    """A sampled token's logprob and alternatives (`engine_sampling.token_logprobs`) as the
    event carries them: each token with its text and bytes."""
    token, logprob, top = found
    text, raw = describe(token)
    alternatives = []
    for alternative, value in top:
        alt_text, alt_raw = describe(alternative)
        alternatives.append(TopLogprob(alt_text, value, tuple(alt_raw)))
    return TokenLogprob(text, logprob, tuple(raw), tuple(alternatives))
