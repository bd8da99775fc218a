"""One request from arrival to its usage record, whatever API it came through.

An API's translation (`broker_api.chat_shape`, and the ones to come) turns its request into
an `Ask`: the job to run and what serving must know about it. `broker_api.serving` then moves
the `Session` through its states, each change through `to`, so every path a request can take
is written down once:

    opened ──> replayed                      an earlier request's answer (Idempotency-Key)
           ──> cached                        the response cache's answer
           ──> admitted ──> running ──> done       the winning attempt's DONE
                        │           ──> failed     the job could not finish (an error)
                        └───────────┴─> cancelled  the client left first
    any of those ──> recorded                its usage record written (none for a replay,
                                             or for a request never admitted)

`running` means output reached the gateway (the time to first token is taken then).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from broker_api.auth import Principal
from broker_api.jobrun import JobRun
from broker_api.output import Output
from schemas.answers import CachedAnswer
from schemas.events import Done
from schemas.jobs import Job, Submission
from schemas.usage import Outcome

State = Literal["opened", "replayed", "cached", "admitted", "running", "done", "failed", "cancelled", "recorded"]

_NEXT: dict[State, frozenset[State]] = {
    "opened": frozenset({"replayed", "cached", "admitted", "recorded"}),
    "replayed": frozenset({"recorded"}),
    "cached": frozenset({"recorded"}),
    "admitted": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"done", "failed", "cancelled"}),
    "done": frozenset({"recorded"}),
    "failed": frozenset({"recorded"}),
    "cancelled": frozenset({"recorded"}),
    "recorded": frozenset(),
}

_OUTCOME: dict[State, Outcome] = {
    "replayed": "cached",
    "cached": "cached",
    "done": "ok",
    "failed": "error",
    "cancelled": "cancelled",
}

# How an API continues an answer on another node: (the job's original request, the text the
# client already has, the tokens it holds) -> the request that carries on from there.
Continuation = Callable[[dict[str, Any], str, int], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Ask:
    """A request as serving sees it: the job's request (what workers read) and the facts the
    gateway needs about it, worked out once by the API's translation."""

    model: str
    body: dict[str, Any]
    choices: int
    token_limit: int | None
    prompt_estimate: int  # tokens, tokenizer-free: for admission, and billing when no worker counted
    stream: bool
    continuation: Continuation | None = None  # None: this API's answers cannot be continued


class StateError(RuntimeError):
    """A transition the diagram above does not have: a bug in the serving code."""


@dataclass(slots=True, eq=False)
class Session:
    ask: Ask
    who: Principal
    job: Job
    sub: Submission  # as first submitted (re-dispatches resubmit copies of it)
    run: JobRun  # registered with the bus only once admitted
    output: Output
    cache_key: str = ""  # "": not looked up in, nor stored to, the response cache
    idempotency_key: str = ""
    started: float = field(default_factory=time.monotonic)
    arrived: float = field(default_factory=time.time)
    first_token: float = 0.0  # monotonic; 0 until output reached the gateway
    ended: float = 0.0  # monotonic time the response ended (the record may be written later)
    status: int = 200  # the HTTP status (or the error's) the client got
    done: Done | None = None
    cached: CachedAnswer | None = None
    _state: State = field(default="opened", init=False)  # changed only through `to`

    @property
    def state(self) -> State:
        return self._state

    @property
    def outcome(self) -> Outcome:
        return _OUTCOME.get(self._state, "cancelled")

    def to(self, state: State) -> None:
        if state not in _NEXT[self._state]:
            raise StateError(f"a session cannot go from {self._state} to {state}")
        self._state = state

    # the transitions that carry data with them

    def answered(self, answer: CachedAnswer, *, replay: bool) -> None:
        self.cached = answer
        self.to("replayed" if replay else "cached")

    def relayed(self, now: float) -> None:
        """Output reached the gateway."""
        if self._state == "admitted":
            self.first_token = now
            self.to("running")

    def finished(self, done: Done) -> None:
        self.done = done
        self.to("done")

    def failed(self, status: int) -> None:
        self.status = status
        self.to("failed")
