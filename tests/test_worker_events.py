"""An attempt's outgoing events (`worker.events.EventStream`) on a publisher that records what
it is handed: a streamed answer's first delta goes at once (a plain answer's waits its window),
later ones are merged within the coalescing window (text joined, tool-call fragments and
logprobs kept in order), sequence numbers have no gaps, and the final event carries whatever
was still waiting."""

from __future__ import annotations

import asyncio
from typing import Any

from schemas.errors import NoCapacityError
from schemas.events import (
    Delta,
    Done,
    Event,
    Failed,
    Heartbeat,
    Piece,
    Start,
    TokenLogprob,
    ToolCallDelta,
    decode_event,
)
from worker.backend import Usage
from worker.events import EventStream

SUBJECT = "ty.reply.gw.j1"


class Recorder:
    """A publisher that keeps every message, decoded."""

    def __init__(self) -> None:
        self.sent: list[Event] = []
        self.subjects: set[str] = set()

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        self.subjects.add(subject)
        self.sent.append(decode_event(payload))


def stream(rec: Recorder, coalesce: float = 0.05) -> EventStream:
    return EventStream(rec, SUBJECT, job_id="j1", attempt=1001, node="n1", coalesce=coalesce)


CALL = (ToolCallDelta(0, "call_1", "lookup", '{"q": '), ToolCallDelta(0, arguments='"x"}'))
LOGPROBS = (TokenLogprob("b", -0.5), TokenLogprob("c", -1.5))


async def test_first_delta_at_once_then_merged_and_the_tail_rides_on_done() -> None:
    rec = Recorder()
    es = stream(rec, coalesce=10.0)  # nothing but the first delta leaves before done
    await es.add(Piece(0, "a", 1))
    assert [type(e) for e in rec.sent] == [Delta]
    await es.add(Piece(0, "b", 1, tool_calls=CALL[:1], logprobs=LOGPROBS[:1]))
    await es.add(Piece(0, "c", 1, tool_calls=CALL[1:], logprobs=LOGPROBS[1:]))
    await es.add(Piece(1, "z", 2))
    await es.add(Piece(0, "d", 1))
    assert len(rec.sent) == 1 and es.tokens == 6 and es.tokens_sent == 1
    await es.done(["stop", "length"], Usage(prompt_tokens=7, completion_tokens=6, cost=0.5))
    first, done = rec.sent
    assert isinstance(first, Delta) and first.pieces == (Piece(0, "a", 1),)
    assert isinstance(done, Done) and (done.finish, done.prompt_tokens, done.completion_tokens, done.cost) == (
        ("stop", "length"),
        7,
        6,
        0.5,
    )
    # consecutive pieces of one choice merge, but text after a tool-call fragment starts a new
    # run (merged, it would move before the fragment); another choice in between does too
    assert done.pieces == (
        Piece(0, "b", 1, CALL[:1], LOGPROBS[:1]),
        Piece(0, "c", 1, CALL[1:], LOGPROBS[1:]),
        Piece(1, "z", 2),
        Piece(0, "d", 1),
    )
    assert [e.seq for e in rec.sent] == [0, 1] and rec.subjects == {SUBJECT}


async def test_a_call_s_logprobs_never_merge_into_the_text_s() -> None:
    """Merged with text, a tool call's token logprobs would read as the text's
    (`Piece.text_logprobs`): the merged piece keeps the text's only."""
    rec = Recorder()
    es = stream(rec, coalesce=10.0)
    await es.add(Piece(0, "a", 1, logprobs=LOGPROBS[:1]))
    await es.add(Piece(0, "b", 1, logprobs=LOGPROBS[1:]))
    await es.add(Piece(0, "", 2, CALL, (TokenLogprob("{", -0.1), TokenLogprob("}", -0.2))))
    await es.done(["tool_calls"], Usage(prompt_tokens=3, completion_tokens=4))
    first, done = rec.sent
    assert isinstance(first, Delta) and isinstance(done, Done)
    assert done.pieces == (Piece(0, "b", 3, CALL, LOGPROBS[1:]),)


async def test_text_logprobs_of_a_piece_without_text_never_merge_into_a_call_s() -> None:
    """A piece with no text may carry text logprobs (the engine's stop sequence tokens): merged
    into a run of call fragments they would read as the call's, so they keep a run of their own."""
    rec = Recorder()
    es = stream(rec, coalesce=10.0)
    await es.add(Piece(0, "a", 1, logprobs=LOGPROBS[:1]))
    await es.add(Piece(0, "", 2, CALL, (TokenLogprob("{", -0.1),)))
    await es.add(Piece(0, "", 1, logprobs=LOGPROBS[1:]))
    await es.add(Piece(0, "", 1, CALL[1:]))
    await es.done(["tool_calls"], Usage(prompt_tokens=3, completion_tokens=5))
    done = rec.sent[-1]
    assert isinstance(done, Done)
    assert [lp for p in done.pieces for lp in p.text_logprobs] == list(LOGPROBS[1:])
    assert [d for p in done.pieces for d in p.tool_calls] == [*CALL, *CALL[1:]]


async def test_a_plain_answer_sends_its_text_with_done_alone() -> None:
    rec = Recorder()
    es = EventStream(rec, SUBJECT, job_id="j1", attempt=1001, node="n1", coalesce=10.0, first_at_once=False)
    await es.add(Piece(0, "a", 1))
    await es.add(Piece(0, "b", 1))
    assert rec.sent == [] and es.tokens == 2
    await es.done(["stop"], Usage(prompt_tokens=3, completion_tokens=2))
    (done,) = rec.sent
    assert isinstance(done, Done) and done.seq == 0 and done.pieces == (Piece(0, "ab", 2),)


async def test_the_node_s_proof_rides_on_the_first_event_even_a_plain_answer_s_done() -> None:
    proof = bytes(range(64))
    for first_at_once in (False, True):
        rec = Recorder()
        es = EventStream(
            rec, SUBJECT, job_id="j1", attempt=1001, node="n1", coalesce=10.0, proof=proof, first_at_once=first_at_once
        )
        await es.add(Piece(0, "a", 1))
        await es.done(["stop"], Usage(prompt_tokens=3, completion_tokens=1))
        assert [e.proof for e in rec.sent] == [proof] + [b""] * (len(rec.sent) - 1), first_at_once
        assert rec.sent[0].seq == 0


async def test_a_plain_answer_still_flushes_when_its_window_ends() -> None:
    rec = Recorder()
    es = EventStream(rec, SUBJECT, job_id="j1", attempt=1001, node="n1", coalesce=0.02, first_at_once=False)
    await es.add(Piece(0, "a", 1))
    for _ in range(200):  # bounded: the window is 20 ms
        if rec.sent:
            break
        await asyncio.sleep(0.01)
    (delta,) = rec.sent
    assert isinstance(delta, Delta) and delta.seq == 0 and delta.pieces == (Piece(0, "a", 1),)


async def test_the_window_flushes_by_itself_and_sequence_numbers_have_no_gaps() -> None:
    rec = Recorder()
    es = stream(rec, coalesce=0.02)
    for i in range(20):
        await es.add(Piece(0, f"w{i} ", 1))
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # the last batch leaves on its timer, without another add
    assert sum(p.tokens for e in rec.sent if isinstance(e, Delta) for p in e.pieces) == 20
    assert "".join(p.text for e in rec.sent if isinstance(e, Delta) for p in e.pieces) == "".join(
        f"w{i} " for i in range(20)
    )
    assert 2 <= len(rec.sent) < 20  # merged, but not all into one
    await es.fail(NoCapacityError("provider down"), retryable=True)
    assert isinstance(rec.sent[-1], Failed) and rec.sent[-1].retryable
    assert rec.sent[-1].error["kind"] == "no_capacity"
    assert [e.seq for e in rec.sent] == list(range(len(rec.sent)))
    beat = decode_event(es.heartbeat())
    assert isinstance(beat, Heartbeat) and beat.seq == len(rec.sent)  # the number the next event would carry


async def test_start_is_sent_only_when_nothing_else_came_first() -> None:
    quick, slow = Recorder(), Recorder()
    es = stream(quick)
    es.start(0.05)
    await es.add(Piece(0, "x", 1))  # the first token beat the start: no START at all
    await asyncio.sleep(0.1)
    assert [type(e) for e in quick.sent] == [Delta] and quick.sent[0].seq == 0
    es = stream(slow, coalesce=0.02)
    es.start(0.01)
    await asyncio.sleep(0.05)
    await es.add(Piece(0, "x", 1))
    await asyncio.sleep(0.05)  # (within a window of the START it waits for the window, like any delta)
    assert [(type(e), e.seq) for e in slow.sent] == [(Start, 0), (Delta, 1)]
