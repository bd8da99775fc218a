"""Incremental detokenization: token ids in, clean text out, one token at a time.

Decoding tokens one by one breaks multi-byte characters (a UTF-8 character split over two
byte-level tokens) and drops the leading spaces some tokenizers attach to word pieces. So, as in
vLLM and TGI, each new token is decoded together with a few tokens before it, and text is only
released once it no longer ends in a replacement character. Then stop sequences are cut and
tool-call markup parsed (`TextPipeline`): what comes out is text and tool-call fragments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from schemas.events import TokenLogprob, TopLogprob
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

    __slots__ = ("_stops", "_parser")

    def __init__(self, stops: tuple[str, ...], parser: ToolCallParser | None = None) -> None:
        self._stops = StopScanner(stops)
        self._parser = parser

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

    def finish(self, text: str = "") -> Output:
        out = self._parse(self._stops.push(text) + self._stops.flush())
        if self._parser is not None:
            out.extend(self._parser.finish())
        return out

    def _parse(self, text: str) -> Output:
        if self._parser is not None:
            return self._parser.push(text) if text else []
        return [text] if text else []


class TextStream:
    """A sequence's text pipeline: detokenize, then `TextPipeline` (stops, tool calls).

    Also counts the tokens whose output has not gone out yet, so every token is accounted for in
    exactly one piece. `markup` maps special tokens that are tool-call markup to their text:
    decoding skips special tokens, so these reach the parser this way.
    """

    __slots__ = ("_decoder", "_pipeline", "_markup", "pending_tokens")

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

    def push(self, token: int) -> Output:
        self.pending_tokens += 1
        if token in self._markup:
            return self._pipeline.push(self._decoder.flush() + self._markup[token])
        return self._pipeline.push(self._decoder.push(token))

    def count_only(self) -> None:
        """A token that produces no text (end of sequence) but is still generated."""
        self.pending_tokens += 1

    def finish(self) -> Output:
        return self._pipeline.finish(self._decoder.flush())

    def take_tokens(self) -> int:
        n, self.pending_tokens = self.pending_tokens, 0
        return n


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
