"""Driving one job to its end: what happens when an attempt fails, goes silent or idle, loses
events or runs out of time.

`decide` is the policy, a pure function: given the run's state, what went wrong and the
settings, it says run the job again (keeping off the pool that failed, when the attempt itself
reported the failure), continue from the text the client already has, or fail with this error.
`JobDriver` is the loop that applies it: it waits for the winning attempt's events, stops the
attempts it gives up on, resubmits, and yields what the client should get. Neither knows any
API's JSON: continuing an answer is the API's own `Continuation` (`broker_api.session`).

An attempt is taken for silent only for silence the gateway could have heard: time in which the
gateway's own loop was behind (`broker_api.lag`) does not count, nor does the time its inbox
holds unread words (`Bus.unread`), up to `jobrun.SILENCE_BOUND` times the silence (the long
chaos run at load ~13 had a gateway declare three jobs silent in one millisecond, a second
after their worker had sent every token: the words waited in the gateway's own inbox).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from broker_api.bus import Bus
from broker_api.jobrun import Broken, JobRun, Streamed
from broker_api.lag import LoopLag
from broker_api.output import Output
from broker_api.session import Continuation
from broker_api.unavailable import NATS_ERRORS, unavailable
from schemas.errors import (
    DeadlineExceededError,
    NoCapacityError,
    TokenyardError,
    WorkerFailedError,
    from_wire,
)
from schemas.events import Claim, Delta, Done, Failed, Start
from schemas.jobs import Submission

log = structlog.get_logger(__name__)

TICK = 0.25  # seconds between liveness checks while no attempt of a job is current
SLACK = 0.01  # seconds past a bound before it is checked: it must have run out by then
# What placing a job again may fail with: no route can take it, or NATS could not take it.
REFUSED: tuple[type[Exception], ...] = (NoCapacityError, *NATS_ERRORS)

# --- what went wrong ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Silent:
    """The current attempt said nothing for longer than the silence allowed."""


@dataclass(frozen=True, slots=True)
class Idle:
    """The current attempt still heartbeats, but sent no output for longer than the idle
    bound after the answer reached the client (a hung backend, a lost upstream read)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class LostEvents:
    """The current attempt's events arrived with a gap."""

    reason: str


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """The attempt reported a failure; `retryable`: another node may succeed."""

    error: TokenyardError
    retryable: bool


@dataclass(frozen=True, slots=True)
class Overdue:
    """The request's deadline passed."""


Failure = Silent | Idle | LostEvents | AttemptFailed | Overdue

# --- what to do about it ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redispatch:
    """Run the job again from the start (nothing reached the client); `avoid` a pool if set."""

    why: str
    avoid: str = ""


@dataclass(frozen=True, slots=True)
class Continue:
    """Run the job again, carrying on from the text the client already has."""

    why: str
    avoid: str = ""


@dataclass(frozen=True, slots=True)
class Fail:
    error: TokenyardError


Decision = Redispatch | Continue | Fail


@dataclass(frozen=True, slots=True)
class RunState:
    dispatch: int  # placements so far (1 for the first)
    committed: bool  # content reached the client
    started: bool  # an attempt is current (a worker took the job)
    pool: str  # the pool the current placement went to
    choices: int
    text_only: bool = True  # what reached the client is text (no tool-call fragments): a prefix can carry it


@dataclass(frozen=True, slots=True)
class Policy:
    max_dispatches: int
    continues: bool  # this model's answers may be continued elsewhere, and the API can


def decide(state: RunState, failure: Failure, policy: Policy) -> Decision:
    if isinstance(failure, Overdue):
        if not state.started and not state.committed:
            return Fail(DeadlineExceededError("No worker answered the request before its deadline."))
        return Fail(DeadlineExceededError("The request did not finish before its deadline."))
    avoid = ""
    if isinstance(failure, AttemptFailed):
        if not failure.retryable:
            return Fail(failure.error)
        why, avoid = failure.error.message.rstrip("."), state.pool
    elif isinstance(failure, LostEvents):
        why = f"the worker's events were lost ({failure.reason})"
    elif isinstance(failure, Idle):
        why = f"the worker sent no output for {failure.seconds:g} s"
    else:
        why = "the worker stopped responding"
    if state.dispatch >= policy.max_dispatches:
        if state.committed:
            return Fail(WorkerFailedError(f"The answer was interrupted: {why}."))
        return Fail(WorkerFailedError(f"The request failed on every attempt ({state.dispatch}); last: {why}."))
    if not state.committed:
        return Redispatch(why, avoid)
    if policy.continues and state.choices == 1 and state.text_only:
        return Continue(why, avoid)
    return Fail(WorkerFailedError(f"The answer was interrupted: {why}."))


# --- the loop that applies it -------------------------------------------------------------


class JobDriver:
    """One admitted job's events up to its DONE. Every Delta and Done it yields has been added
    to `output` already."""

    def __init__(
        self,
        bus: Bus,
        run: JobRun,
        sub: Submission,
        output: Output,
        *,
        policy: Policy,
        continuation: Continuation | None,
        submit_timeout: float,
        lag: LoopLag,  # how far behind this gateway's loop ran: not the attempt's silence
        on_continue: Callable[[], None] = lambda: None,  # counted by the caller's metrics
        proven: Callable[[Claim, str], str] = lambda claim, pool: claim.node,  # see `_failed_node`
        idle: float = 0.0,  # seconds a started answer may go without output (0: no bound)
        tick: float = TICK,
    ) -> None:
        self._idle = idle
        self._lag = lag
        self._proven = proven
        self._on_continue = on_continue
        self._bus = bus
        self._run = run
        self._sub = sub
        self._request = sub.job.request  # as the client asked: what a continuation extends
        self._output = output
        self._policy = policy
        self._continuation = continuation
        self._interrupted = ""  # why the answer was first interrupted, once it is being continued
        self._submit_timeout = submit_timeout
        self._tick = tick

    async def events(self) -> AsyncGenerator[Delta | Done, None]:
        """The winning attempt's DELTA and DONE events, in order; raises if the job fails."""
        run = self._run
        while True:
            item = await self._next()
            failure: Failure
            match item:
                case Done() if item.cancelled:
                    # A stopped attempt's count, not an answer: it was told to stop by something
                    # other than this driver (whose own stops refuse what follows), e.g. a stop
                    # meant for another delivery of the job on its node. The long chaos run's
                    # run 10 had two such answers shaped with finish "cancelled": HTTP 500.
                    log.warning("job.attempt_cancelled", job_id=run.job.id, attempt=item.attempt, node=item.node)
                    run.drop_current()
                    failure = AttemptFailed(WorkerFailedError("The worker stopped the attempt."), retryable=True)
                case Delta() | Done():
                    self._output.add(item)
                    yield item
                    if isinstance(item, Done):
                        return
                    continue
                case Start():
                    continue
                case None:
                    if not run.queue.empty():
                        # an event came between the wait running out and this task resuming: the
                        # attempt spoke, and a lagging loop read it late (its `heard` may look old)
                        continue
                    now = time.monotonic()
                    silent, idle = self._silent(now), run.idle(now, self._idle)
                    if not silent and not idle:
                        continue
                    gone = run.drop_current()
                    if gone:
                        await self._bus.stop(gone[1], run.job.id, gone[0], "silent" if silent else "idle")
                    failure = Silent() if silent else Idle(self._idle)
                    if idle and not silent:
                        log.warning("job.idle", job_id=run.job.id, attempt=gone[0] if gone else -1, seconds=self._idle)
                case Overdue():
                    failure = item
                case Broken():
                    await self._bus.stop(item.node, run.job.id, item.attempt, "lost events")
                    failure = LostEvents(item.reason)
                case Failed():
                    run.drop_current()
                    failure = AttemptFailed(from_wire(item.error or {}), item.retryable)
                    if self._interrupted and not item.retryable:
                        # the continuation's own refusal (of the prefix, of its length): the client
                        # is told what interrupted its answer instead
                        log.info("job.continuation_refused", job_id=run.job.id, error=failure.error.message)
                        raise WorkerFailedError(f"The answer was interrupted: {self._interrupted}.")
            await self._apply(decide(self._state(), failure, self._policy))

    def _state(self) -> RunState:
        run = self._run
        return RunState(
            dispatch=run.job.dispatch,
            committed=run.committed,
            started=run.current is not None,
            pool=run.pool_of(run.job.dispatch),
            choices=self._output.choices,
            text_only=not any(p.tool_calls for p in self._output.parts),
        )

    def _behind(self, now: float) -> float:
        """Seconds since the run's silence clock started in which this gateway read nothing."""
        since = self._run.quiet_since
        return 0.0 if since is None else self._lag.behind_since(since, now)

    def _silent(self, now: float) -> bool:
        run = self._run
        behind, unread = self._behind(now), self._bus.unread
        silent = run.silent(now, behind=behind, unread=unread > 0)
        if silent:
            since = run.quiet_since or now
            log.info(
                "job.silent",
                job_id=run.job.id,
                attempt=run.current if run.current is not None else -1,
                quiet=round(now - since, 3),
                behind=round(behind, 3),
                unread=unread,
            )
        return silent

    async def _next(self) -> Streamed | Broken | Overdue | None:
        """The next item, or None once the run may have gone silent or idle (a tick while no
        attempt is current); Overdue once the deadline passed. A running attempt's wait ends
        when its silence or idle bound could first run out, not every tick: at 4,000 open
        streams the ticks' timeouts firing were a tenth of the gateway's CPU."""
        run = self._run
        if not run.queue.empty():
            return run.queue.get_nowait()
        remaining = run.job.deadline - time.time()
        if remaining <= 0:
            return Overdue()
        now = time.monotonic()
        due = run.next_check(self._idle, self._behind(now))
        # past its bound and not given up on (its gateway's inbox held unread words): look again
        # in a tick, not in a loop of SLACK-long waits on a gateway that is behind already
        wait = self._tick if due is None or due <= now else due - now + SLACK
        try:
            async with asyncio.timeout(min(remaining, wait)):
                return await run.queue.get()
        except TimeoutError:
            return None

    async def _apply(self, decision: Decision) -> None:
        if isinstance(decision, Fail):
            raise decision.error
        run, sub = self._run, self._sub
        job = run.job
        again = dataclasses.replace(job, dispatch=job.dispatch + 1)
        continuing = isinstance(decision, Continue)
        if continuing:
            self._interrupted = self._interrupted or decision.why
            again = dataclasses.replace(again, request=self._continued())
            log.info("job.continue", job_id=job.id, dispatch=job.dispatch, carried_tokens=self._output.tokens)
            self._output.carry_on()
            self._on_continue()
        avoid = sub.avoid + ((decision.avoid,) if decision.avoid else ())
        # A failure the attempt reported counts against its node (and model), never the whole
        # pool: one node's death never closes a pool with healthy siblings. Silence does not
        # count (a node that is gone leaves the fleet with its adverts; one that only answered
        # late would be taken out for nothing).
        reported = bool(decision.avoid)
        node = self._failed_node() if reported or continuing else ""
        self._sub = dataclasses.replace(
            sub,
            job=again,
            avoid=avoid,
            failed_pool=run.pool_of(job.dispatch) if reported else "",
            failed_node=node if reported else "",
            continuation=continuing,  # placed only on a route that carries the text on
            left_node=node if continuing else "",  # ... on another node than this one
        )
        run.redispatch(again, continuing=continuing)
        log.info("job.redispatch", job_id=job.id, dispatch=again.dispatch, why=decision.why)
        try:
            admission = await self._bus.submit(self._sub, timeout=self._submit_timeout, deadline=job.deadline, run=run)
        except REFUSED as e:
            if not continuing:
                if isinstance(e, TokenyardError):
                    raise
                raise unavailable(e, what="placing the job again") from e
            # No route takes the text as a prefix (ContinuationUnavailableError), none is up, or
            # NATS could not take the job (mid-stream: never an exception that cuts the
            # connection): the client is told what really failed, never the refusal.
            log.info("job.continuation_unavailable", job_id=job.id, why=decision.why)
            raise WorkerFailedError(f"The answer was interrupted: {self._interrupted}.") from None
        run.placed(again.dispatch, admission.pool, admission.model)

    def _failed_node(self) -> str:
        """The node the attempt given up on proves it is (`proven`: its claim checked as for
        its usage record, `broker_api.attribution`), "" if it proves none. A claim alone must
        never put another node's health at stake: any node may write any id into its events."""
        claim = self._run.claim
        return self._proven(claim, self._run.route_of(claim.attempt)) if claim.node else ""

    def _continued(self) -> dict[str, Any]:
        if self._continuation is None:  # decide() continues only where the API can
            raise WorkerFailedError("The answer was interrupted.")
        return self._continuation(self._request, self._output.text(0), self._output.tokens)
