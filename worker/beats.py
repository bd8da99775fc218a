"""Keeping running jobs alive: one heartbeat per gateway for all its jobs, and their JetStream leases.

Every `interval` the worker sends each gateway it runs jobs for one `schemas.beats.Beat` (a
request) naming every attempt of that gateway's jobs it runs, and the gateway answers which of
them must stop. Per-job requests cost half of a worker's CPU at 3,800 open streams
(bench/RESULTS.md, section 8); one request per (worker, gateway) costs what the fan-out costs.

What the worker concludes from a gateway's beats, for every attempt it named:
- no responder: the gateway is gone (`GATEWAY_GONE`; its process died, NATS says so at once);
- no beat answered for its patience (`patience`: at least `PATIENCE_BEATS` intervals): the gateway
  is silent (`GATEWAY_SILENT`), frozen or cut off;
- listed in the answer: the gateway said stop (`GATEWAY_STOP`).

A loaded gateway answers late, not never: its loop runs seconds behind while its inbox fills
(bench/RESULTS.md, section 8). So a beat waits for its answer as long as the patience, the next
ones go out meanwhile (at most `BEATS_IN_FLIGHT` unanswered at once: asking a gateway that is
behind more often only adds to what it must read), and any answer, however late, proves the
gateway alive. Three beats unanswered within one interval each, as before, stopped the live
jobs of a gateway three seconds behind.

Each job's JetStream message is kept with `in_progress` only every third of the ack wait
(its lease), not on every beat: the lease is what redelivers the job if the worker dies, and a
third of it leaves two chances before it runs out. The lease does not wait for any answer.

A job from a gateway from before beats (`Job.beats` false) gets the old per-job heartbeat
request instead (`beat_alone`), with the same patience, so workers may be upgraded before
gateways and the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas import subjects
from schemas.beats import BEAT_ENTRIES, Beat, BeatAnswer, Beating
from schemas.codec import WireError
from schemas.jobs import STOP
from worker.events import EventStream

log = structlog.get_logger(__name__)

PATIENCE_BEATS = 3  # intervals a gateway is given to answer, however short the patience set
BEATS_IN_FLIGHT = 3  # beats to one gateway that may wait for their answers at once
GATEWAY_GONE = "gateway gone"
GATEWAY_SILENT = "gateway silent"
GATEWAY_STOP = "gateway said stop"

RunKey = tuple[str, int]  # (job id, attempt): one worker may hold two attempts of one job
Stopper = Callable[[RunKey, str], None]


@dataclass(slots=True)
class Kept:
    """One running attempt as the beats see it."""

    msg: Msg  # its job's JetStream message: `in_progress` keeps it leased
    gateway: str  # whose beat names it
    token: str  # its job's reply token
    out: EventStream  # for the next sequence number
    leased: float  # monotonic time of its last `in_progress` (or its delivery)


@dataclass(slots=True)
class Hearing:
    """How one gateway answers this worker's beats."""

    answered: float  # monotonic time of its last answer (or of the first beat that waits for one)
    asking: int = 0  # beats sent to it that wait for their answers

    def gone(self, now: float, patience: float) -> bool:
        """No answer for longer than `patience`, though asked all along."""
        return now - self.answered > patience


def patience(interval: float, seconds: float) -> float:
    """How long a gateway may answer no beat before its jobs stop: `seconds`, and never fewer
    than `PATIENCE_BEATS` intervals."""
    return max(PATIENCE_BEATS * interval, seconds)


class Beats:
    """The beat loop of one worker. `add` an attempt when it starts, `discard` it when it ends;
    `stop(key, reason)` is called for every attempt a gateway gave up on (or said to stop)."""

    def __init__(
        self, nc: NATS, *, node: str, interval: float, ack_wait: float, patience: float, stop: Stopper
    ) -> None:
        self._nc = nc
        self._node = node
        self._interval = interval
        self._patience = patience
        self._lease_every = max(interval, ack_wait / 3)
        self._stop = stop
        self._kept: dict[RunKey, Kept] = {}
        self._hearing: dict[str, Hearing] = {}  # gateway -> how it answers
        self._asking: set[asyncio.Task[None]] = set()  # beats waiting for their answers (strong refs)

    def add(self, key: RunKey, msg: Msg, reply: str, out: EventStream) -> None:
        gateway = subjects.reply_gateway(reply)
        self._kept[key] = Kept(msg, gateway, subjects.reply_token(reply), out, time.monotonic())

    def discard(self, key: RunKey) -> None:
        self._kept.pop(key, None)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                try:
                    await self.beat()
                except Exception:  # top of the loop: one bad round must not end every job's heartbeat
                    log.exception("worker.beat_failed")
        finally:
            for task in self._asking:
                task.cancel()

    async def beat(self) -> None:
        """One round: renew the leases that are due, give up on the gateways that answered
        nothing for their patience, then send one beat to each other gateway (its answer is
        read when it comes). What each beat says is read before anything is awaited: an
        attempt may end meanwhile."""
        now = time.monotonic()
        by_gateway: dict[str, list[tuple[RunKey, Beating]]] = {}
        due: list[Msg] = []
        for key, kept in self._kept.items():
            if now - kept.leased >= self._lease_every:
                kept.leased = now
                due.append(kept.msg)
            by_gateway.setdefault(kept.gateway, []).append((key, Beating(kept.token, key[1], kept.out.seq)))
        for gateway in [g for g in self._hearing if g not in by_gateway]:
            del self._hearing[gateway]
        for gateway, named in by_gateway.items():
            hearing = self._hearing.setdefault(gateway, Hearing(now))
            if hearing.gone(now, self._patience):
                log.warning("worker.gateway_silent", gateway=gateway, attempts=len(named), seconds=self._patience)
                del self._hearing[gateway]  # its attempts end now; a new one starts the clock again
                self._stop_all([key for key, _ in named], GATEWAY_SILENT)
            elif hearing.asking < BEATS_IN_FLIGHT:
                hearing.asking += 1
                task = asyncio.create_task(self._beat_one(gateway, hearing, named))
                self._asking.add(task)
                task.add_done_callback(self._asking.discard)
        for msg in due:
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

    async def _beat_one(self, gateway: str, hearing: Hearing, named: list[tuple[RunKey, Beating]]) -> None:
        chunks = [named[i : i + BEAT_ENTRIES] for i in range(0, len(named), BEAT_ENTRIES)]
        try:
            answers = await asyncio.gather(*(self._ask(gateway, chunk) for chunk in chunks), return_exceptions=True)
        finally:
            hearing.asking -= 1
        if any(isinstance(a, nats.errors.NoRespondersError) for a in answers):
            self._stop_all([key for key, _ in named], GATEWAY_GONE)
            return
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, nats.errors.TimeoutError):  # no answer within the patience: `beat` gives up
                continue
            if isinstance(answer, BaseException):  # a lost connection: the next round asks again
                log.warning("worker.beat_unsent", gateway=gateway, error=repr(answer))
                continue
            hearing.answered = time.monotonic()
            for i in answer.stop:
                if 0 <= i < len(chunk):
                    self._stop(chunk[i][0], GATEWAY_STOP)

    async def _ask(self, gateway: str, chunk: list[tuple[RunKey, Beating]]) -> BeatAnswer:
        beat = Beat(self._node, tuple(b for _, b in chunk))
        reply = await self._nc.request(subjects.reply_beat(gateway), beat.encode(), timeout=self._patience)
        try:
            return BeatAnswer.decode(reply.data)
        except WireError as e:
            log.warning("worker.bad_beat_answer", gateway=gateway, error=str(e))
            return BeatAnswer()

    def _stop_all(self, keys: list[RunKey], reason: str) -> None:
        for key in keys:
            self._stop(key, reason)


async def beat_alone(
    nc: NATS,
    msg: Msg,
    reply: str,
    key: RunKey,
    out: EventStream,
    *,
    interval: float,
    patience: float,
    stop: Stopper,
) -> None:
    """A job from a gateway that reads no beats: its own heartbeat request every `interval`
    (and its lease renewed with each), as before beats; they wait for their answers and give
    the gateway up as beats do."""
    hearing = Hearing(time.monotonic())
    asking: set[asyncio.Task[None]] = set()

    async def ask() -> None:
        try:
            answer = await nc.request(reply, out.heartbeat(), timeout=patience)
        except nats.errors.NoRespondersError:
            stop(key, GATEWAY_GONE)
            return
        except nats.errors.Error:  # unanswered (the loop below gives up in time) or a lost connection
            return
        finally:
            hearing.asking -= 1
        hearing.answered = time.monotonic()
        if answer.data == STOP:
            stop(key, GATEWAY_STOP)

    try:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()
            if hearing.gone(time.monotonic(), patience):
                stop(key, GATEWAY_SILENT)
                return
            if hearing.asking < BEATS_IN_FLIGHT:
                hearing.asking += 1
                task = asyncio.create_task(ask())
                asking.add(task)
                task.add_done_callback(asking.discard)
    finally:
        for task in asking:
            task.cancel()
