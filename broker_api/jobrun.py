"""One job's events, fenced to one attempt at a time, checked for order and liveness.

The bus hands every event for the job to `offer` (synchronously, in arrival order). At most
one attempt is *current*; its events go to the queue the serving code reads. Another
attempt's events are refused (the bus then tells that worker to stop) unless the current one
has gone silent and nothing has reached the client yet (`committed` is false), in which case
the newcomer takes over. So the tokens a client receives come from exactly one attempt.

Order: every accepted event must carry the next sequence number of its attempt; a heartbeat
carries the number the worker will use next, so a lost message shows up as a gap even when
nothing follows it. A gap fails the attempt (a `Broken` item in the queue) rather than leaving
a hole in the answer.

A run changes only through its methods: the bus offers events and closes it, the job driver
(`broker_api.attempts`) records placements and re-dispatches, the serving code commits it.
The winning attempt's final DONE comes as a request; its answer is held until the job's usage
record is stored (`answer_when_recorded`, `recorded`), and so is the final count of an attempt
given up on after its output reached the client, or told to stop (`holds`).

Silence is measured from when the gateway *read* the attempt's last word, so time in which the
gateway itself read nothing must not count: `silent` takes how long the gateway was `behind`
meanwhile (`broker_api.lag`) and whether its inbox holds words not read yet (`unread`), and an
attempt quiet for `SILENCE_BOUND` times the silence is silent whatever they say (a dead worker
on a gateway that never catches up is still given up on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from schemas.events import Claim, Delta, Done, Failed, Heartbeat, Start
from schemas.jobs import ATTEMPTS_PER_DISPATCH, Job

# An attempt quiet this many times the silence is silent however far behind its gateway ran.
SILENCE_BOUND = 3.0
# What `offer` takes: every event but heartbeats, which go to `heartbeat`.
Streamed = Start | Delta | Done | Failed


@dataclass(frozen=True, slots=True)
class Broken:
    """The current attempt lost a message: it cannot be trusted to finish the answer."""

    attempt: int
    node: str
    reason: str


class JobRun:
    def __init__(self, job: Job, *, silence: float) -> None:
        self._job = job
        self.silence = silence
        self.current: int | None = None
        self.claim = Claim(job.id, -1, "")  # who the current (or last) attempt's first event named
        self._claims: dict[int, Claim] = {}  # attempt -> who its first event named
        self.heard = 0.0  # monotonic time of the current attempt's last word
        self.progressed = 0.0  # ... of its last output (heartbeats are words, not output)
        self._held: list[Callable[[], Awaitable[None]]] = []  # final DONEs' answers, sent once billed
        self._then: list[Callable[[], object]] = []  # what else waits for the record (`when_recorded`)
        self._recorded = False
        self._refused_at: float | None = None  # monotonic time an attempt was refused while none was current
        self._committed = False
        self._closed = False
        self._finished = False
        self._pools: dict[int, str] = {}  # dispatch -> the pool it was placed on
        self._models: dict[int, str] = {}  # dispatch -> the model placed, where a fallback list chose another
        self._min_attempt = 0  # attempts below this are refused (set when an answer is continued)
        self._next_seq = 0
        self._refused: set[int] = set()
        self._delivered: set[int] = set()  # attempts whose output reached the client
        self.queue: asyncio.Queue[Streamed | Broken] = asyncio.Queue()

    # --- what the others read -----------------------------------------------------------

    @property
    def current_node(self) -> str:
        """The node the current (or last) attempt's events name (proven or not: see `claim`)."""
        return self.claim.node

    @property
    def job(self) -> Job:
        """The job as last placed (a re-dispatch has the next `dispatch`)."""
        return self._job

    @property
    def committed(self) -> bool:
        """Content reached the client: no other attempt may take over from now on."""
        return self._committed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def finished(self) -> bool:
        """The current attempt's DONE arrived."""
        return self._finished

    def pool_of(self, dispatch: int) -> str:
        return self._pools.get(dispatch, "")

    def route_of(self, attempt: int) -> str:
        """The pool an attempt ran on."""
        return self._pools.get(attempt // ATTEMPTS_PER_DISPATCH, "")

    def claim_of(self, attempt: int) -> Claim:
        """Who an attempt's first event named (no node: it never started)."""
        return self._claims.get(attempt) or Claim(self._job.id, attempt, "")

    def model_of(self, attempt: int) -> str:
        """The model an attempt ran, where a `models` fallback list placed another than the
        job's; "" otherwise."""
        return self._models.get(attempt // ATTEMPTS_PER_DISPATCH, "")

    # --- what the others change -----------------------------------------------------------

    def commit(self) -> None:
        """Content of the current attempt reached the client."""
        self._committed = True
        if self.current is not None:
            self._delivered.add(self.current)

    def holds(self, ev: Done) -> bool:
        """The final count of an attempt that did not win waits for the job's usage record like
        the winner's, if the record is not stored yet and either the attempt's output reached the
        client (it was given up on: a continuation carries the answer on) or it was told to stop
        (`cancelled`: another delivery of the job was current, or the job moved on). If this
        gateway dies before the record is stored, that worker reports the job: nobody else
        might. The continuation may not be placed yet, and the attempt whose words the client
        has may have died with its worker: then the delivery told to stop holds the job's work
        message, the one record left that the job ran (chaos runs 10 and 11: RESULTS section 9). A stopped
        worker waits for its answer up to the job's deadline; a count not cancelled (an attempt
        that finished before its stop came) waits only `BILLED_WAIT`, too short to hold."""
        return not self._recorded and (ev.attempt in self._delivered or ev.cancelled)

    def heard_from(self, dispatch: int) -> bool:
        """An attempt of `dispatch` sent an event (taken or refused): the job is placed at it."""
        return any(a // ATTEMPTS_PER_DISPATCH == dispatch for a in (*self._claims, *self._refused))

    def placed(self, dispatch: int, pool: str, model: str = "") -> None:
        self._pools[dispatch] = pool
        if model:
            self._models[dispatch] = model

    def redispatch(self, job: Job, *, continuing: bool) -> None:
        """The job placed again (`job.dispatch` one more). A continuation refuses every earlier
        attempt for good: the new one carries the answer on from what the client has."""
        self._job = job
        self._refused_at = None
        if continuing:
            self._min_attempt = job.attempt_id(0)

    def close(self) -> None:
        self._closed = True

    @property
    def awaiting_record(self) -> bool:
        """The winning attempt's final DONE waits for the job's usage record to be stored."""
        return bool(self._held) and not self._recorded

    def answer_when_recorded(self, answer: Callable[[], Awaitable[None]]) -> None:
        """Hold the answer to a final DONE until the job's usage record is stored (`recorded`):
        a worker not answered reports the job itself (`worker.reports`)."""
        self._held.append(answer)

    def when_recorded(self, then: Callable[[], object]) -> None:
        self._then.append(then)

    async def recorded(self) -> None:
        """The job's usage record is stored: answer the final DONEs that wait."""
        self._recorded = True
        held, self._held = self._held, []
        for then in self._then:
            then()
        for answer in held:
            await answer()

    def _delivered_again(self, attempt: int) -> bool:
        """Closed, its record not stored yet: an attempt not seen before is the job delivered
        again because the worker that finished it died before hearing that it was billed. It
        runs to its own final DONE, held like the winner's (`answer_when_recorded`), so that if
        this gateway dies before the record is stored, that worker reports the job."""
        return self.awaiting_record and attempt not in self._refused and attempt not in self._claims

    # --- events -------------------------------------------------------------------------

    def _adopt(self, ev: Streamed, now: float) -> bool:
        if ev.seq != 0:  # joined mid-way: its start was lost
            self._refused.add(ev.attempt)
            if self._refused_at is None:  # nothing else may come: see `silent`
                self._refused_at = now
            return False
        self.current, self._next_seq, self.heard = ev.attempt, 0, now
        self.claim = self._claims[ev.attempt] = Claim(ev.job_id, ev.attempt, ev.node, ev.proof)
        self._refused_at = None
        self.progressed = now
        return True

    def offer(self, ev: Streamed, now: float) -> bool:
        """Take an event; False means the sending attempt must stop."""
        if self._closed:
            return self._delivered_again(ev.attempt)  # taken, and nothing more
        if ev.attempt in self._refused or ev.attempt < self._min_attempt:
            return False
        if ev.attempt != self.current:
            if isinstance(ev, Done) and ev.cancelled:
                # a stopped attempt's count (told to stop as another delivery of the job) is no
                # answer, and may not take over from the one current, however quiet it is
                self._refused.add(ev.attempt)
                return False
            if self.current is not None and (self._committed or now - self.heard <= self.silence):
                self._refused.add(ev.attempt)
                return False
            if self.current is not None:  # silent, and nothing of it reached the client
                self._forget(self.current)
            if not self._adopt(ev, now):
                return False
        self.heard = self.progressed = now
        if ev.seq != self._next_seq:
            self._break(f"event {self._next_seq} of the attempt never arrived")
            return False
        self._next_seq += 1
        if isinstance(ev, Done):
            self._finished = True
        self.queue.put_nowait(ev)
        return True

    def _unqueue(self, attempt: int) -> None:
        """Drop `attempt`'s events that wait unread (a loaded gateway reads them late): the job
        gave up on it, and what it sent must not reach the client after that decision. Read
        after a takeover, they came ahead of the new attempt, which starts the answer over; read
        after a continuation was placed, they came beyond the text it carries on from."""
        kept = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, Broken) or item.attempt != attempt:
                kept.append(item)
        for item in kept:
            self.queue.put_nowait(item)

    def heartbeat(self, ev: Heartbeat, now: float) -> bool:
        """A heartbeat from some attempt; False means it must stop."""
        return self.beat(ev.attempt, ev.seq, now)

    def beat(self, attempt: int, seq: int, now: float) -> bool:
        """`attempt` is alive and its next event will carry `seq` (a heartbeat, or one entry of
        a worker's beat); False means it must stop."""
        if self._closed:
            return self._delivered_again(attempt)
        if attempt in self._refused or attempt < self._min_attempt:
            return False
        if attempt != self.current:
            return self.current is None  # not started as far as we know: let it go on
        self.heard = now
        if seq > self._next_seq:
            self._break(f"events {self._next_seq}..{seq - 1} of the attempt never arrived")
            return False
        return True

    def _break(self, reason: str) -> None:
        if self.current is None:
            return
        self.queue.put_nowait(Broken(self.current, self.current_node, reason))
        self._forget(self.current)

    def _forget(self, attempt: int) -> None:
        """`attempt` is given up for good. Once the answer reached the client, so is every other
        delivery of its dispatch: it would start over from that dispatch's beginning and repeat
        what the client has; only a later dispatch (a continuation) may carry the answer on.
        Its events still unread are dropped (`_unqueue`)."""
        self._refused.add(attempt)
        self._unqueue(attempt)
        self.current = None
        if self._committed:
            self._min_attempt = max(self._min_attempt, (attempt // ATTEMPTS_PER_DISPATCH + 1) * ATTEMPTS_PER_DISPATCH)

    @property
    def quiet_since(self) -> float | None:
        """The monotonic time the silence clock runs from: the current attempt's last word, or,
        with none current, the refusal of the only one heard from; None: no clock runs."""
        return self.heard if self.current is not None else self._refused_at

    def silent(self, now: float, *, behind: float = 0.0, unread: bool = False) -> bool:
        """The current attempt said nothing for longer than the silence allows; or none is
        current and the only one heard from was refused that long ago (it was told to stop: the
        job would otherwise wait out its deadline for nobody). `behind`: seconds since then in
        which the gateway read nothing (its loop was late), which do not count; `unread`: its
        inbox holds words not read yet, which may be this attempt's. Either way, quiet for
        `SILENCE_BOUND` times the silence is silent."""
        since = self.quiet_since
        if since is None:
            return False
        quiet = now - since
        if quiet > SILENCE_BOUND * self.silence:
            return True
        return not unread and quiet > self.silence + behind

    def next_check(self, limit: float, behind: float = 0.0) -> float | None:
        """The earliest monotonic time `silent(behind=behind)` or `idle(limit)` could turn true
        with no event queued meanwhile (heartbeats only push it later); None while no attempt is
        current, when a refusal may start the silence clock without an event."""
        if self.current is None:
            return None
        due = self.heard + min(self.silence + behind, SILENCE_BOUND * self.silence)
        if limit > 0 and self._committed:
            due = min(due, self.progressed + limit)
        return due

    def idle(self, now: float, limit: float) -> bool:
        """The answer reached the client, and the current attempt, alive or not, has sent no
        output for `limit` seconds (0: no limit)."""
        return limit > 0 and self._committed and self.current is not None and now - self.progressed > limit

    def drop_current(self) -> tuple[int, str] | None:
        """Give up on the current attempt (dead or failed); returns (attempt, node) to stop."""
        if self.current is None:
            return None
        gone = (self.current, self.current_node)
        self._forget(self.current)
        return gone
