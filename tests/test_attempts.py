"""The redispatch policy (`broker_api.attempts.decide`), every combination of what went wrong,
how far the job got and what the settings allow."""

from __future__ import annotations

import itertools

import pytest

from broker_api.attempts import (
    AttemptFailed,
    Continue,
    Fail,
    Failure,
    LostEvents,
    Overdue,
    Policy,
    Redispatch,
    RunState,
    Silent,
    decide,
)
from schemas.errors import DeadlineExceededError, InvalidRequestError, NoCapacityError, WorkerFailedError

RETRYABLE = NoCapacityError("the node's provider is down")
FINAL = InvalidRequestError("bad request", param="x")

FAILURES: list[Failure] = [
    Silent(),
    LostEvents("event 3 of the attempt never arrived"),
    AttemptFailed(RETRYABLE, retryable=True),
    AttemptFailed(FINAL, retryable=False),
    Overdue(),
]
STATES = [
    RunState(dispatch=d, committed=c, started=st, pool=p, choices=n)
    for d, c, st, p, n in itertools.product((1, 2, 3), (False, True), (False, True), ("", "pool-a"), (1, 2))
]
POLICIES = [Policy(max_dispatches=m, continues=c) for m, c in itertools.product((1, 3), (False, True))]


def state(**kw: object) -> RunState:
    return RunState(**{"dispatch": 1, "committed": False, "started": True, "pool": "a", "choices": 1, **kw})  # type: ignore[arg-type]


POLICY = Policy(max_dispatches=3, continues=True)


def test_before_anything_reached_the_client_the_job_runs_again() -> None:
    assert decide(state(), Silent(), POLICY) == Redispatch("the worker stopped responding")
    assert decide(state(), LostEvents("gap"), POLICY) == Redispatch("the worker's events were lost (gap)")


def test_a_reported_failure_keeps_the_next_placement_off_its_pool() -> None:
    assert decide(state(pool="a"), AttemptFailed(RETRYABLE, True), POLICY) == Redispatch(RETRYABLE.message, "a")
    assert decide(state(pool=""), AttemptFailed(RETRYABLE, True), POLICY) == Redispatch(RETRYABLE.message)


def test_a_failure_that_no_node_can_fix_is_the_clients_error() -> None:
    assert decide(state(), AttemptFailed(FINAL, False), POLICY) == Fail(FINAL)


def test_after_delivery_the_answer_continues_where_allowed_and_ends_otherwise() -> None:
    assert decide(state(committed=True), Silent(), POLICY) == Continue("the worker stopped responding")
    assert decide(state(committed=True, pool="a"), AttemptFailed(RETRYABLE, True), POLICY) == Continue(
        RETRYABLE.message, "a"
    )
    for cannot in (
        decide(state(committed=True), Silent(), Policy(3, False)),
        decide(state(committed=True, choices=2), Silent(), POLICY),
    ):
        assert isinstance(cannot, Fail) and isinstance(cannot.error, WorkerFailedError)
        assert cannot.error.message == "The answer was interrupted: the worker stopped responding."


def test_the_dispatch_budget_ends_it() -> None:
    spent = decide(state(dispatch=3), Silent(), POLICY)
    assert isinstance(spent, Fail) and isinstance(spent.error, WorkerFailedError)
    assert spent.error.message == "The request failed on every attempt (3); last: the worker stopped responding."
    spent = decide(state(dispatch=3, committed=True), Silent(), POLICY)
    assert isinstance(spent, Fail) and spent.error.message.startswith("The answer was interrupted")


def test_the_deadline_is_a_504_saying_whether_any_worker_answered() -> None:
    for st, words in ((state(started=False), "No worker answered"), (state(), "did not finish")):
        decision = decide(st, Overdue(), POLICY)
        assert isinstance(decision, Fail) and isinstance(decision.error, DeadlineExceededError)
        assert words in decision.error.message and decision.error.status == 504


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("failure", FAILURES, ids=lambda f: type(f).__name__)
def test_every_combination_keeps_the_rules(failure: Failure, policy: Policy) -> None:
    for st in STATES:
        decision = decide(st, failure, policy)
        if isinstance(failure, Overdue):
            assert isinstance(decision, Fail) and isinstance(decision.error, DeadlineExceededError)
        elif isinstance(failure, AttemptFailed) and not failure.retryable:
            assert decision == Fail(failure.error)
        elif st.dispatch >= policy.max_dispatches:
            assert isinstance(decision, Fail) and isinstance(decision.error, WorkerFailedError)
        elif not st.committed:
            assert isinstance(decision, Redispatch)  # nothing delivered: simply run again
        elif policy.continues and st.choices == 1:
            assert isinstance(decision, Continue)
        else:
            assert isinstance(decision, Fail) and "interrupted" in decision.error.message
        if isinstance(decision, (Redispatch, Continue)):
            # only a failure the attempt reported names a pool to avoid, and only a real one
            assert decision.avoid == (st.pool if isinstance(failure, AttemptFailed) else "")
            assert decision.why


def test_an_answer_with_tool_calls_delivered_is_not_continued_as_text() -> None:
    state = RunState(dispatch=1, committed=True, started=True, pool="p", choices=1, text_only=False)
    decision = decide(state, Silent(), Policy(max_dispatches=3, continues=True))
    assert isinstance(decision, Fail) and "interrupted" in decision.error.message
