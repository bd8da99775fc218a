"""What a request is charged (`broker_api.billing`), and its session's states
(`broker_api.session`), without NATS."""

from __future__ import annotations

import pytest

from broker_api import billing
from broker_api.auth import Principal
from broker_api.jobrun import JobRun
from broker_api.output import Output
from broker_api.session import Ask, Session, StateError
from schemas.answers import CachedAnswer
from schemas.events import Delta, Done, Piece
from schemas.jobs import Job, Submission
from schemas.tenancy import Limits

JOB = Job(id="j1", model="m", request={"messages": []}, reply="r", deadline=1e12)


def delta(attempt: int, seq: int, *pieces: Piece) -> Delta:
    return Delta("j1", attempt, seq, "n1", pieces)


def done(attempt: int, seq: int, *, prompt: int, completion: int, cost: float | None = None) -> Done:
    return Done(
        "j1", attempt, seq, "n1", finish=("stop",), prompt_tokens=prompt, completion_tokens=completion, cost=cost
    )


def relayed(*events: Delta | Done, choices: int = 1) -> Output:
    out = Output(choices)
    for ev in events:
        out.add(ev)
    return out


def charge(out: Output, d: Done | None = None, cached: CachedAnswer | None = None) -> billing.Charge:
    return billing.charge(out, d, cached, prompt_estimate=42, cache_hit_cost=0.25)


def test_a_finished_run_is_billed_from_the_workers_count_when_the_relayed_text_can_hold_it() -> None:
    fin = done(1001, 2, prompt=11, completion=5, cost=0.5)
    out = relayed(delta(1001, 0, Piece(0, "a b c", 3)), delta(1001, 1, Piece(0, " d e", 2)), fin)
    assert charge(out, fin) == billing.Charge(11, 5, cost=0.5)
    # a worker claiming more than the text it sent could hold: what was relayed
    greedy = done(1001, 2, prompt=11, completion=500)
    assert charge(out, greedy).completion_tokens == 5


def test_a_continued_answer_bills_the_carried_text_once() -> None:
    out = relayed(delta(1001, 0, Piece(0, "one two three", 3)))
    out.carry_on()  # the next attempt's prompt holds "one two three" as assistant text
    fin = done(2001, 1, prompt=14, completion=2)
    out.add(delta(2001, 0, Piece(0, " four five", 2)))
    out.add(fin)
    assert out.text(0) == "one two three four five"
    assert charge(out, fin) == billing.Charge(14 - 3, 3 + 2)


def test_without_a_count_the_estimate_stands_and_nothing_relayed_costs_nothing() -> None:
    assert charge(relayed(delta(1001, 0, Piece(0, "x y", 2)))) == billing.Charge(42, 2)
    assert charge(Output(1)) == billing.Charge(0, 0)


def test_a_cache_hit_is_billed_its_numbers_at_the_configured_fraction() -> None:
    hit = CachedAnswer(["x"], ["stop"], 7, 3, 0.4)
    assert charge(Output(1), None, hit) == billing.Charge(7, 3, cached_tokens=7, cost=0.1)


def test_only_a_winning_attempts_pieces_count_and_unknown_choices_are_dropped() -> None:
    out = relayed(
        delta(1001, 0, Piece(0, "lost", 1)),
        delta(1002, 0, Piece(0, "won", 1), Piece(5, "no such choice", 4)),
        choices=2,
    )
    assert (out.attempt, out.text(0), out.text(1), out.tokens) == (1002, "won", "", 1)


def test_only_limited_keys_reserve() -> None:
    assert billing.reserved_tokens(Submission(job=JOB, estimated_tokens=30)) == 0
    limited = Submission(job=JOB, key_limits=Limits(rpm=5), estimated_tokens=30)
    assert billing.reserved_tokens(limited) == 30
    assert billing.reserved_tokens(Submission(job=JOB, org_limits=Limits(tpm=5), estimated_tokens=0)) == 1


def session(**ask: object) -> Session:
    values: dict[str, object] = {"model": "m", "body": JOB.request, "choices": 1, "token_limit": None}
    values.update({"prompt_estimate": 9, "stream": False, **ask})
    who = Principal(org="o", key_id="k", admin=False, project="p")
    return Session(
        ask=Ask(**values),  # type: ignore[arg-type]
        who=who,
        job=JOB,
        sub=Submission(job=JOB),
        run=JobRun(JOB, silence=1.0),
        output=Output(1),
        started=100.0,
        arrived=1_700_000_000.0,
    )


def test_the_usage_record_of_a_finished_run() -> None:
    s = session(stream=True)
    s.run.placed(1, "own")
    s.to("admitted")
    fin = done(1001, 1, prompt=4, completion=2, cost=0.01)
    assert s.run.offer(delta(1001, 0, Piece(0, "a b", 2)), now=0) and s.run.offer(fin, now=0)
    s.output.add(delta(1001, 0, Piece(0, "a b", 2)))
    s.relayed(100.25)
    s.output.add(fin)
    s.finished(fin)
    s.ended = 101.0
    bill = billing.charge(s.output, s.done, None, prompt_estimate=9, cache_hit_cost=0)
    record = billing.usage_record(s, bill, node=s.run.current_node, now=0)
    assert (record.job_id, record.org, record.project, record.key_id, record.model) == ("j1", "o", "p", "k", "m")
    assert (record.route, record.node, record.attempts) == ("own", "n1", 1)
    assert (record.prompt_tokens, record.completion_tokens, record.cost) == (4, 2, 0.01)
    assert (record.ttft_ms, record.duration_ms, record.outcome, record.stream) == (250.0, 1000.0, "ok", True)


def test_the_usage_record_of_a_cache_hit() -> None:
    s = session()
    hit = CachedAnswer(["x"], ["stop"], 7, 3, 0.4)
    s.answered(hit, replay=False)
    record = billing.usage_record(
        s, billing.charge(s.output, None, hit, prompt_estimate=9, cache_hit_cost=1), node="", now=100.5
    )
    assert (record.route, record.outcome, record.cached_tokens, record.cost, record.ttft_ms) == (
        "cache",
        "cached",
        7,
        0.4,
        0,
    )
    assert record.duration_ms == 500.0


def test_a_session_moves_only_along_its_diagram() -> None:
    s = session()
    with pytest.raises(StateError):
        s.to("done")  # never admitted
    s.to("admitted")
    s.relayed(100.1)
    assert (s.state, s.first_token) == ("running", 100.1)
    s.relayed(100.2)  # more output: still running, first token unchanged
    assert s.first_token == 100.1
    s.to("cancelled")
    assert s.outcome == "cancelled"
    with pytest.raises(StateError):
        s.to("done")  # a cancelled request cannot finish after all
    s.to("recorded")
    with pytest.raises(StateError):
        s.to("recorded")
    failed = session()
    failed.to("admitted")
    failed.failed(502)
    assert (failed.outcome, failed.status) == ("error", 502)
