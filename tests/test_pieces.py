"""Each generated token's logprob on the piece its token became (`worker.pieces`): model text
run token by token through the engine's own `TextStream` (decoder, stops, tool-call parser), as
the engine's batch loop drives it, byte by byte (the tiny model's tokenizer) and in BPE-like
words (the echo script's). What a client is shown (`Piece.text_logprobs`) must be the content's
tokens, in order, once each; a call's markup and arguments never."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.events import Piece, TokenLogprob
from worker.echo_script import tokens_of
from worker.engine_text import TextStream
from worker.toolcalls import ToolCallParser
from worker.toolformats import FORMATS

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'


def by_bytes(text: str) -> list[bytes]:
    return [bytes([b]) for b in text.encode()]


def by_words(text: str) -> list[bytes]:
    return [t.encode() for t in tokens_of(text)]


def generate(
    tokens: list[bytes], *, tools: bool = True, stops: tuple[str, ...] = (), **parser: Any
) -> tuple[list[Piece], list[TokenLogprob]]:
    """The pieces a sequence sends for these tokens, as `engine_batch` drives its `TextStream`:
    a push per token, pieces whenever there is output, and the rest at the end (or at a stop,
    or once the calls allowed are made); and the logprobs of the tokens generated. Token i's
    logprob is -i, so each is told apart."""
    vocab = sorted(set(tokens))
    ids = [vocab.index(t) for t in tokens]
    names = parser.pop("names", None)
    stream = TextStream(
        lambda seq: b"".join(vocab[i] for i in seq).decode("utf-8", errors="replace"),
        stops,
        parser=ToolCallParser(FORMATS["hermes"], names=names, **parser) if tools else None,
    )
    logprobs = [TokenLogprob(t.decode(errors="replace"), -float(i), tuple(t)) for i, t in enumerate(tokens)]
    out: list[Piece] = []
    for n, (token, logprob) in enumerate(zip(ids, logprobs)):
        step = stream.push(token, logprob)
        if stream.stopped or stream.spent:
            out.extend(stream.pieces(0, [*step, *stream.finish()]))
            return out, logprobs[: n + 1]
        if step:
            out.extend(stream.pieces(0, step))
    out.extend(stream.pieces(0, stream.finish()))
    return out, logprobs


def content(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)


def shown(pieces: list[Piece]) -> list[TokenLogprob]:
    return [lp for p in pieces for lp in p.text_logprobs]


def shown_text(pieces: list[Piece]) -> str:
    return b"".join(bytes(lp.bytes or ()) for lp in shown(pieces)).decode()


def check(pieces: list[Piece], logprobs: list[TokenLogprob], text: str, unsent: str = "") -> None:
    """The content is `text`; the logprobs shown are its tokens, in order, once each; every other
    logprob sent rides on a call piece; none goes out twice, and the only ones not sent are a
    call's markup after its last fragment (`unsent`: the closing tag, no fragment follows to carry
    it)."""
    assert content(pieces) == text
    assert shown_text(pieces) == text
    everything = [lp for p in pieces for lp in p.logprobs]
    assert len({lp.logprob for lp in everything}) == len(everything)  # each at most once
    assert [lp.logprob for lp in shown(pieces)] == sorted((lp.logprob for lp in shown(pieces)), reverse=True)
    markup = [lp for p in pieces if p.tool_calls and not p.text for lp in p.logprobs]
    assert {lp.logprob for lp in markup}.isdisjoint(lp.logprob for lp in shown(pieces))
    assert sum(p.tokens for p in pieces) == len(logprobs)
    sent = {lp.logprob for lp in everything}
    assert b"".join(bytes(lp.bytes or ()) for lp in logprobs if lp.logprob not in sent).decode() == unsent


SPLITS = pytest.mark.parametrize("split", [by_bytes, by_words], ids=["bytes", "words"])


@SPLITS
def test_plain_text_shows_every_token(split: Any) -> None:
    text = "Héllo, wörld: 1 < 2 and <b>bold</b>."
    for tools in (False, True):
        pieces, logprobs = generate(split(text), tools=tools)
        check(pieces, logprobs, text)
        assert shown(pieces) == logprobs


@SPLITS
def test_text_then_a_call_shows_the_text_only(split: Any) -> None:
    pieces, logprobs = generate(split("Let me check." + CALL))
    check(pieces, logprobs, "Let me check.", unsent="}\n</tool_call>")
    calls = [d for p in pieces for d in p.tool_calls]
    assert json.loads("".join(d.arguments for d in calls)) == {"city": "Paris", "days": 2}


@SPLITS
def test_held_back_text_that_is_no_call_shows_once_in_order(split: Any) -> None:
    for text in (
        "a <tool_cal and more",  # a marker's start, then not
        "<tool_call>not json</tool_call> after",  # a marker, then no call
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # a name not offered
        "ends on a marker's start <tool_",  # held until the end
    ):
        pieces, logprobs = generate(split(text), names={"get_weather"})
        check(pieces, logprobs, text)
        assert shown(pieces) == logprobs


@SPLITS
def test_two_calls_with_text_between_and_after(split: Any) -> None:
    pieces, logprobs = generate(split("Checking both." + CALL + "\nand " + CALL2 + "\nDone."))
    check(pieces, logprobs, "Checking both.\nand \nDone.", unsent="}\n</tool_call>")
    assert [d.name for p in pieces for d in p.tool_calls if d.name] == ["get_weather", "get_time"]


def test_a_call_cut_short_and_a_limit_of_calls_show_no_markup() -> None:
    cut, logprobs = generate(by_bytes('Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'))
    check(cut, logprobs, "Hi ")
    spent, logprobs = generate(by_words("Hi " + CALL + " never shown " + CALL2), max_calls=1)
    check(spent, logprobs, "Hi ", unsent="}")


def test_a_stop_sequence_keeps_its_tokens_with_the_text() -> None:
    tokens = by_words("one two\n\nthree")
    pieces, logprobs = generate(tokens, tools=False, stops=("\n\n",))
    assert content(pieces) == "one two"
    assert shown(pieces) == logprobs and logprobs[-1].token == "\n\n"  # as before tools: the stop's token is listed
