"""Keeping running jobs alive: one heartbeat per gateway for all its jobs, and their JetStream leases.

Every `interval` the worker sends each gateway it runs jobs for one `schemas.beats.Beat` (a
request) naming every attempt of that gateway's jobs it runs, and the gateway answers which of
them must stop. Per-job requests cost half of a worker's CPU at 3,800 open streams
(bench/RESULTS.md, section 8); one request per (worker, gateway) costs what the fan-out costs.

What the worker concludes from a gateway's beats, for every attempt it named:
- no responder: the gateway is gone (`GATEWAY_GONE`);
- `GATEWAY_MISSES` beats in a row unanswered: the gateway is silent (`GATEWAY_SILENT`);
- listed in the answer: the gateway said stop (`GATEWAY_STOP`).

Each job's JetStream message is kept with `in_progress` only every third of the ack wait
(its lease), not on every beat: the lease is what redelivers the job if the worker dies, and a
third of it leaves two chances before it runs out.

A job from a gateway from before beats (`Job.beats` false) gets the old per-job heartbeat
request instead (`beat_alone`), so workers may be upgraded before gateways and the other way
round.
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

GATEWAY_MISSES = 3  # beats unanswered in a row before the worker decides a gateway is gone
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


class Beats:
    """The beat loop of one worker. `add` an attempt when it starts, `discard` it when it ends;
    `stop(key, reason)` is called for every attempt a gateway gave up on (or said to stop)."""

    def __init__(self, nc: NATS, *, node: str, interval: float, ack_wait: float, stop: Stopper) -> None:
        self._nc = nc
        self._node = node
        self._interval = interval
        self._lease_every = max(interval, ack_wait / 3)
        self._stop = stop
        self._kept: dict[RunKey, Kept] = {}
        self._misses: dict[str, int] = {}  # gateway -> beats unanswered in a row

    def add(self, key: RunKey, msg: Msg, reply: str, out: EventStream) -> None:
        gateway = subjects.reply_gateway(reply)
        self._kept[key] = Kept(msg, gateway, subjects.reply_token(reply), out, time.monotonic())

    def discard(self, key: RunKey) -> None:
        self._kept.pop(key, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.beat()
            except Exception:  # top of the loop: one bad round must not end every job's heartbeat
                log.exception("worker.beat_failed")

    async def beat(self) -> None:
        """One round: renew the leases that are due, then one beat per gateway, all at once.
        What each beat says is read before anything is awaited: an attempt may end meanwhile."""
        now = time.monotonic()
        by_gateway: dict[str, list[tuple[RunKey, Beating]]] = {}
        due: list[Msg] = []
        for key, kept in self._kept.items():
            if now - kept.leased >= self._lease_every:
                kept.leased = now
                due.append(kept.msg)
            by_gateway.setdefault(kept.gateway, []).append((key, Beating(kept.token, key[1], kept.out.seq)))
        for gateway in [g for g in self._misses if g not in by_gateway]:
            del self._misses[gateway]
        for msg in due:
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()
        await asyncio.gather(*(self._beat_one(gateway, named) for gateway, named in by_gateway.items()))

    async def _beat_one(self, gateway: str, named: list[tuple[RunKey, Beating]]) -> None:
        chunks = [named[i : i + BEAT_ENTRIES] for i in range(0, len(named), BEAT_ENTRIES)]
        answers = await asyncio.gather(*(self._ask(gateway, chunk) for chunk in chunks), return_exceptions=True)
        keys = [key for key, _ in named]
        if any(isinstance(a, nats.errors.NoRespondersError) for a in answers):
            self._stop_all(keys, GATEWAY_GONE)
            return
        if any(isinstance(a, nats.errors.TimeoutError) for a in answers):
            self._misses[gateway] = misses = self._misses.get(gateway, 0) + 1
            if misses >= GATEWAY_MISSES:
                self._stop_all(keys, GATEWAY_SILENT)
            return
        self._misses.pop(gateway, None)
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, BaseException):  # a lost connection: the next round asks again
                log.warning("worker.beat_unsent", gateway=gateway, error=repr(answer))
                continue
            for i in answer.stop:
                if 0 <= i < len(chunk):
                    self._stop(chunk[i][0], GATEWAY_STOP)

    async def _ask(self, gateway: str, chunk: list[tuple[RunKey, Beating]]) -> BeatAnswer:
        beat = Beat(self._node, tuple(b for _, b in chunk))
        reply = await self._nc.request(subjects.reply_beat(gateway), beat.encode(), timeout=self._interval)
        try:
            return BeatAnswer.decode(reply.data)
        except WireError as e:
            log.warning("worker.bad_beat_answer", gateway=gateway, error=str(e))
            return BeatAnswer()

    def _stop_all(self, keys: list[RunKey], reason: str) -> None:
        for key in keys:
            self._stop(key, reason)


async def beat_alone(
    nc: NATS, msg: Msg, reply: str, key: RunKey, out: EventStream, *, interval: float, stop: Stopper
) -> None:
    """A job from a gateway that reads no beats: its own heartbeat request every `interval`
    (and its lease renewed with each), as before beats."""
    misses = 0
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(nats.errors.Error):
            await msg.in_progress()
        try:
            answer = await nc.request(reply, out.heartbeat(), timeout=interval)
        except nats.errors.NoRespondersError:
            stop(key, GATEWAY_GONE)
            return
        except nats.errors.TimeoutError:
            misses += 1
            if misses >= GATEWAY_MISSES:
                stop(key, GATEWAY_SILENT)
                return
            continue
        misses = 0
        if answer.data == STOP:
            stop(key, GATEWAY_STOP)
            return
