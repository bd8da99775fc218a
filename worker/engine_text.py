"""Incremental detokenization: token ids in, clean text out, one token at a time.

Decoding tokens one by one breaks multi-byte characters (a UTF-8 character split over two
byte-level tokens) and drops the leading spaces some tokenizers attach to word pieces. So, as in
vLLM and TGI, each new token is decoded together with a few tokens before it, and text is only
released once it no longer ends in a replacement character.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.stops import StopScanner

Decode = Callable[[list[int]], str]

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


class TextStream:
    """A sequence's text pipeline: detokenize, then hold back possible stop sequences.

    Also counts the tokens whose text has not gone out yet, so every token is accounted for in
    exactly one delta.
    """

    __slots__ = ("_decoder", "_stops", "pending_tokens")

    def __init__(self, decode: Decode, stops: tuple[str, ...]) -> None:
        self._decoder = IncrementalDecoder(decode)
        self._stops = StopScanner(stops)
        self.pending_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, token: int) -> str:
        self.pending_tokens += 1
        return self._stops.push(self._decoder.push(token))

    def count_only(self) -> None:
        """A token that produces no text (end of sequence) but is still generated."""
        self.pending_tokens += 1

    def finish(self) -> str:
        text = self._stops.push(self._decoder.flush())
        return text + self._stops.flush()

    def take_tokens(self) -> int:
        n, self.pending_tokens = self.pending_tokens, 0
        return n
