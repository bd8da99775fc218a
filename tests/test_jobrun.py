"""The gateway's per-job fence, without NATS: one attempt's events reach the client, in order,
with no gaps; a silent attempt can be replaced only before anything was delivered."""

from __future__ import annotations

from typing import Any

from broker_api.jobrun import Broken, JobRun
from schemas.events import Delta, Done, Event, Heartbeat, Piece, Start
from schemas.jobs import Job

JOB = Job(id="j", model="m", request={}, reply="r", deadline=1e12)
START, DELTA, DONE, HEARTBEAT = Start.kind, Delta.kind, Done.kind, Heartbeat.kind


def ev(kind: str, attempt: int, seq: int, node: str = "a") -> Any:
    head = ("j", attempt, seq, node)
    if kind == DELTA:
        return Delta(*head, pieces=(Piece(0, "x", 1),))
    if kind == DONE:
        return Done(*head, finish=("stop",), prompt_tokens=1, completion_tokens=1)
    return Heartbeat(*head) if kind == HEARTBEAT else Start(*head)


def drain(run: JobRun) -> list[Event | Broken]:
    out = []
    while not run.queue.empty():
        out.append(run.queue.get_nowait())
    return out


def test_first_attempt_is_adopted_and_its_events_pass_in_order() -> None:
    run = JobRun(JOB, silence=1.0)
    assert run.offer(ev(START, 1001, 0), now=0)
    assert run.offer(ev(DELTA, 1001, 1), now=0.1)
    assert run.offer(ev(DONE, 1001, 2), now=0.2)
    assert [e.kind for e in drain(run) if not isinstance(e, Broken)] == [START, DELTA, DONE]
    assert run.finished


def test_a_second_attempt_is_refused_while_the_first_is_alive() -> None:
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(START, 1001, 0), now=0)
    assert not run.offer(ev(START, 1002, 0, node="b"), now=0.5)
    assert not run.offer(ev(DELTA, 1002, 1, node="b"), now=0.6)  # refused for good
    assert run.current == 1001


def test_a_silent_attempt_is_replaced_before_delivery_only() -> None:
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(START, 1001, 0), now=0)
    assert run.silent(now=1.5)
    assert run.offer(ev(START, 1002, 0, node="b"), now=1.5)
    assert run.current == 1002
    assert not run.offer(ev(DELTA, 1001, 1), now=1.6)  # the zombie wakes up: dropped

    committed = JobRun(JOB, silence=1.0)
    committed.offer(ev(DELTA, 1001, 0), now=0)
    committed.commit()
    assert not committed.offer(ev(DELTA, 1002, 0, node="b"), now=5.0)
    assert committed.current == 1001


def test_a_stopped_attempts_count_never_takes_over() -> None:
    """The long chaos run's run 10: a second delivery of the job, told to stop (its beats came
    while the first was current), sent its count as its first event, a DONE "cancelled", while
    the first was quiet; it took over and was shaped as the answer (an HTTP 500). Refused now,
    and the first attempt's answer goes on."""
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(START, 1001, 0), now=0)
    stopped = Done("j", 1002, 0, "b", finish=("cancelled",), prompt_tokens=1, completion_tokens=2)
    assert not run.offer(stopped, now=1.5)  # the first one quiet past the silence, even so
    assert run.current == 1001
    assert run.offer(ev(DONE, 1001, 1), now=1.6)
    assert [e.kind for e in drain(run) if not isinstance(e, Broken)] == [START, DONE]

    none_current = JobRun(JOB, silence=1.0)
    assert not none_current.offer(stopped, now=0)
    assert none_current.current is None and none_current.queue.empty()


async def test_a_stopped_attempts_count_waits_for_the_record_though_it_lost() -> None:
    """Chaos runs 10 and 11 (traced in 11a): the attempt whose words reached the client died with its
    worker, JetStream delivered the job again, and that delivery was told to stop (the answer
    had started). Its count, answered "stop" at once, let its worker settle the job's work
    message, the last record that the job ran; then the gateway died before its own record.
    Now a stopped attempt's count waits for the record like the winner's. A count that is not
    a stop's, from an attempt whose words never reached the client, is answered at once, and
    once the record is stored nothing waits."""
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(START, 1001, 0), now=0)
    run.offer(ev(DELTA, 1001, 1), now=0.1)
    run.commit()
    assert not run.offer(ev(START, 1002, 0, node="b"), now=0.2)
    stopped = Done("j", 1002, 1, "b", finish=("cancelled",), prompt_tokens=1, completion_tokens=2)
    assert not run.offer(stopped, now=0.3) and run.holds(stopped)
    finished_first = Done("j", 1003, 0, "c", finish=("stop",), prompt_tokens=1, completion_tokens=2)
    assert not run.offer(finished_first, now=0.4) and not run.holds(finished_first)
    given_up = Done("j", 1001, 2, "a", finish=("stop",), prompt_tokens=1, completion_tokens=2)
    assert run.holds(given_up)  # its words reached the client
    await run.recorded()
    assert not run.holds(stopped) and not run.holds(given_up)


def test_an_attempt_that_joins_mid_way_is_refused() -> None:
    run = JobRun(JOB, silence=1.0)
    assert not run.offer(ev(DELTA, 1001, 3), now=0)
    assert run.current is None


def test_a_gap_breaks_the_attempt_instead_of_leaving_a_hole() -> None:
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(DELTA, 1001, 0), now=0)
    assert not run.offer(ev(DELTA, 1001, 2), now=0.1)  # seq 1 was lost
    items = drain(run)
    assert isinstance(items[-1], Broken) and items[-1].attempt == 1001
    assert run.current is None
    assert not run.offer(ev(DELTA, 1001, 3), now=0.2)


def test_a_heartbeat_reveals_a_lost_last_message() -> None:
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(DELTA, 1001, 0), now=0)
    assert run.heartbeat(ev(HEARTBEAT, 1001, 1), now=0.5)  # nothing lost: next is 1
    assert not run.heartbeat(ev(HEARTBEAT, 1001, 2), now=1.0)  # seq 1 went missing
    assert isinstance(drain(run)[-1], Broken)


def test_heartbeats_keep_an_attempt_alive_and_closed_runs_stop_everyone() -> None:
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(START, 1001, 0), now=0)
    for t in (0.8, 1.6, 2.4):
        assert run.heartbeat(ev(HEARTBEAT, 1001, 1), now=t)
    assert not run.silent(now=3.0)
    assert run.heartbeat(ev(HEARTBEAT, 1005, 0, node="c"), now=3.0) is False  # not current, one exists
    run.close()
    assert not run.heartbeat(ev(HEARTBEAT, 1001, 1), now=3.1)
    assert not run.offer(ev(DELTA, 1001, 1), now=3.1)


def test_the_next_check_is_when_silence_or_idleness_could_first_run_out() -> None:
    run = JobRun(JOB, silence=1.0)
    assert run.next_check(limit=3.0) is None  # nothing current: a refusal may start the clock unannounced
    run.offer(ev(START, 1001, 0), now=0)
    assert run.next_check(limit=3.0) == 1.0  # the silence bound; idleness counts only once committed
    assert run.beat(1001, 1, now=0.8)
    assert run.next_check(limit=3.0) == 1.8  # a heartbeat pushes it later, no event needed
    assert not run.silent(now=1.7) and run.silent(now=1.81)
    run.offer(ev(DELTA, 1001, 1), now=1.0)
    run.commit()
    for t in (1.5, 2.5, 3.5):
        run.beat(1001, 2, now=t)
    assert run.next_check(limit=3.0) == 4.0  # output last at 1.0: idle from 4.0 although heard at 3.5
    assert run.idle(now=4.01, limit=3.0)


def test_a_refused_only_attempt_counts_as_silent_so_the_job_is_placed_again() -> None:
    run = JobRun(JOB, silence=1.0)
    assert not run.offer(ev(DELTA, 1001, 1), now=0.0)  # its start was lost: refused, told to stop
    assert not run.silent(0.5)
    assert run.silent(1.5)  # nothing else came: not waited out until the deadline
    run.redispatch(JOB, continuing=False)
    assert not run.silent(5.0)  # the new placement gets its own time


def test_each_attempt_keeps_the_claim_its_first_event_made() -> None:
    """Billing names the node of the attempt whose output the answer holds, not the latest one
    heard from (a replacement that started but sent nothing must not take its place)."""
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(DELTA, 1001, 0, node="a"), now=0)
    assert run.silent(now=1.5)
    run.offer(ev(START, 2001, 0, node="b"), now=1.5)
    assert run.claim.node == "b" and run.claim_of(2001).node == "b"
    assert run.claim_of(1001).node == "a" and run.claim_of(1001).attempt == 1001
    assert run.claim_of(3001).node == ""  # never started


def test_once_delivered_no_other_attempt_of_a_dropped_attempts_dispatch_takes_over() -> None:
    """After the answer reached the client, only a continuation (a later dispatch, carrying the
    delivered text) may go on with it. A redelivery of the same dispatch starts from that
    dispatch's beginning: adopted between the drop of its sibling and the continuation's
    placement, it repeated what the client had (the long chaos run: 11 words for 9)."""
    for drop in ("given up", "lost events"):
        run = JobRun(JOB, silence=1.0)
        assert run.offer(ev(START, 1001, 0), now=0)
        assert run.offer(ev(DELTA, 1001, 1), now=0.1)
        run.commit()
        if drop == "given up":
            assert run.drop_current() == (1001, "a")
        else:
            assert not run.offer(ev(DELTA, 1001, 3), now=0.2)  # event 2 never came
        assert not run.offer(ev(START, 1002, 0, node="b"), now=2.0), drop
        assert run.current is None
        run.redispatch(Job(id="j", model="m", request={}, reply="r", deadline=1e12, dispatch=2), continuing=True)
        assert run.offer(ev(START, 2001, 0, node="c"), now=2.1)  # the continuation does
        assert run.current == 2001

    uncommitted = JobRun(JOB, silence=1.0)  # nothing delivered: a fresh start is as good as any
    uncommitted.offer(ev(START, 1001, 0), now=0)
    uncommitted.drop_current()
    assert uncommitted.offer(ev(START, 1002, 0, node="b"), now=2.0)


async def test_a_closed_job_whose_record_waits_holds_a_delivery_of_it_again_to_its_done() -> None:
    """The winner's final DONE waits for the usage record; its worker dies, and JetStream
    delivers the job again: that attempt is told to go on and its DONE is held too (so that if
    the gateway dies before the record is stored, that worker reports the job). Attempts given
    up on are still stopped, and once the record is stored nothing more is held."""
    run = JobRun(JOB, silence=1.0)
    run.offer(ev(START, 1001, 0), now=0)
    run.offer(ev(DELTA, 1001, 1), now=0.1)
    assert not run.offer(ev(START, 1002, 0, node="b"), now=0.2)  # refused while 1001 runs
    assert run.offer(ev(DONE, 1001, 2), now=0.3)
    answered: list[str] = []

    async def answer(who: str) -> None:
        answered.append(who)

    run.answer_when_recorded(lambda: answer("winner"))
    run.close()
    assert run.awaiting_record
    assert run.heartbeat(ev(HEARTBEAT, 1003, 0, node="c"), now=1.0)  # delivered again: go on
    assert run.offer(ev(START, 1003, 0, node="c"), now=1.0)
    assert run.offer(ev(DONE, 1003, 1, node="c"), now=1.1)
    run.answer_when_recorded(lambda: answer("again"))
    assert not run.heartbeat(ev(HEARTBEAT, 1002, 1, node="b"), now=1.2)  # given up on: stop
    kept: list[str] = []
    run.when_recorded(lambda: kept.append("forgotten"))
    await run.recorded()
    assert answered == ["winner", "again"] and kept == ["forgotten"]
    assert not run.awaiting_record and not run.offer(ev(START, 1004, 0, node="d"), now=2.0)
    assert [e.kind for e in drain(run) if not isinstance(e, Broken)] == [START, DELTA, DONE]  # nothing more queued


def test_an_attempt_replaced_before_its_events_were_read_leaves_none_of_them_to_read() -> None:
    """A takeover is allowed while nothing reached the client; but what the silent attempt sent
    may still wait unread in the queue (a loaded gateway reads it late). Read after the new
    attempt's events, it reached the client first and the new attempt repeated it (the long
    chaos run: 4 words, then the whole answer again). It is dropped at the takeover."""
    run = JobRun(JOB, silence=1.0)
    assert run.offer(ev(START, 1001, 0), now=0)
    assert run.offer(ev(DELTA, 1001, 1), now=0.1)  # not read yet
    assert run.offer(ev(START, 1002, 0, node="b"), now=1.5)  # 1001 silent, nothing delivered
    assert run.offer(ev(DELTA, 1002, 1, node="b"), now=1.6)
    assert [(e.attempt, e.kind) for e in drain(run)] == [(1002, START), (1002, DELTA)]


def test_an_attempt_given_up_on_leaves_none_of_its_unread_events_to_read() -> None:
    """Once the driver gives up on an attempt (silent, idle) and continues the answer from the
    text the client has, what the attempt sent before that but was not read yet must not reach
    the client: the continuation carries on from the text without it, and the client got a word
    twice (the long chaos run at load ~13). A gap's `Broken` stays to be read."""
    run = JobRun(JOB, silence=1.0)
    assert run.offer(ev(START, 1001, 0), now=0)
    assert run.offer(ev(DELTA, 1001, 1), now=0.1)
    assert [e.kind for e in drain(run)] == [START, DELTA]  # read, and delivered
    run.commit()
    assert run.offer(ev(DELTA, 1001, 2), now=0.2)  # not read yet
    assert run.drop_current() == (1001, "a")
    assert drain(run) == []

    broken = JobRun(JOB, silence=1.0)
    assert broken.offer(ev(START, 1001, 0), now=0)
    assert broken.offer(ev(DELTA, 1001, 1), now=0.1)
    assert not broken.offer(ev(DELTA, 1001, 3), now=0.2)  # event 2 lost
    assert [type(e).__name__ for e in drain(broken)] == ["Broken"]


def test_time_the_gateway_was_behind_or_unread_words_are_not_silence_up_to_the_bound() -> None:
    """Silence counts from when the gateway read the attempt's last word: seconds in which the
    gateway read nothing (`behind`) do not count, nor does a moment its inbox holds unread
    words; quiet for `SILENCE_BOUND` times the silence is silent whatever they say (a dead
    worker on a gateway that never catches up)."""
    run = JobRun(JOB, silence=1.0)
    assert run.offer(ev(START, 1001, 0), now=10.0)
    assert run.silent(11.5)
    assert not run.silent(11.5, behind=1.0)  # 1.5 s quiet, 1 s of it the gateway's own lag
    assert run.silent(12.5, behind=1.0)
    assert not run.silent(12.5, unread=True)  # what it sent may wait in the inbox
    assert not run.silent(12.9, behind=5.0, unread=True)
    assert run.silent(13.1, behind=5.0, unread=True)  # past 3x the silence
    assert run.next_check(0, behind=0.5) == 11.5
    assert run.next_check(0, behind=9.0) == 13.0  # never past the bound
    assert run.quiet_since == 10.0

    refused = JobRun(JOB, silence=1.0)
    assert refused.quiet_since is None and not refused.silent(100.0, behind=0.0)
    assert not refused.offer(ev(DELTA, 1001, 3), now=10.0)  # joined mid-way: refused, nothing else may come
    assert refused.quiet_since == 10.0
    assert not refused.silent(11.5, behind=1.0) and refused.silent(11.5) and refused.silent(13.1, unread=True)
