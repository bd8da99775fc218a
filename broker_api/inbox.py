"""The gateway's event inbox: every event and beat its workers send, routed to the job's run.

One subscription (`reply_inbox(gateway_id)`, made by `broker_api.bus`) receives the events of
every job this gateway runs; each event goes to the `JobRun` its subject's reply token belongs
to (a secret in the job's envelope: `schemas.subjects.reply_subject`), and only if it speaks of
that job and of a dispatch the gateway made. So a node that learns another job's id cannot
inject events into it: events on an unknown token are dropped without a word (answering them
with a stop would let a forger stop other nodes' jobs). Events of a job this gateway still
knows but that lost (the client left, another attempt won) are answered with a stop, so no
worker keeps generating for nobody; a heartbeat on an unknown token is answered "stop" too (the
answer goes only to its sender). Heartbeats come once per worker and interval for all of this
gateway's jobs it runs (`schemas.beats`, on the same inbox), each attempt named by its job's
reply token; the answer lists the attempts that must stop. A final DONE comes as a request and
is always answered (to its sender alone): at once if it lost, else once the job's usage record
is stored; the count of an attempt that lost waits for the record too if it was told to stop
or its words reached the client (`JobRun.holds`). A worker whose DONE is not answered in time
reports the job itself (`schemas.usage.WorkerReport`), so a gateway that dies between the
answer and its record leaves no job unbilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker_api.accounting import PATIENCE
from broker_api.jobrun import JobRun
from schemas import subjects
from schemas.beats import Beat, BeatAnswer, Beating
from schemas.codec import WireError
from schemas.events import Done, Heartbeat, decode_event
from schemas.jobs import ATTEMPTS_PER_DISPATCH, CONTINUE, STOP, Stop

log = structlog.get_logger(__name__)

RECORD_WAIT = PATIENCE + 10.0  # seconds a closed job's events are still heard while its record is retried


class Inbox:
    """The runs this gateway's events go to, by job id and by reply token; `on_message` is
    the inbox subscription's handler."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self.runs: dict[str, JobRun] = {}
        self._by_token: dict[str, JobRun] = {}  # reply token -> its job's run

    def open(self, run: JobRun) -> None:
        """Route the job's events to `run` from now on."""
        self.runs[run.job.id] = run
        self._by_token[subjects.reply_token(run.job.reply)] = run

    def close(self, run: JobRun) -> None:
        """Forget a job (closed already); while its usage record waits, its events are still
        heard: a delivery of the job again is answered as its winner (`JobRun`)."""
        self.runs.pop(run.job.id, None)
        token = subjects.reply_token(run.job.reply)
        if run.awaiting_record:
            run.when_recorded(lambda: self._by_token.pop(token, None))
            asyncio.get_running_loop().call_later(RECORD_WAIT, self._by_token.pop, token, None)  # if never
        else:
            self._by_token.pop(token, None)

    async def on_message(self, msg: Msg) -> None:
        token = subjects.reply_token(msg.subject)
        if token == subjects.BEAT_TOKEN:
            await self._on_beat(msg)
            return
        try:
            ev = decode_event(msg.data)
        except WireError as e:
            log.warning("job.bad_event", subject=msg.subject, error=str(e))
            return
        run = self._by_token.get(token)
        if run is not None and (ev.job_id != run.job.id or ev.attempt // ATTEMPTS_PER_DISPATCH > run.job.dispatch):
            log.warning("job.forged_event", job_id=run.job.id, claimed=ev.job_id, attempt=ev.attempt)
            run = None
        now = time.monotonic()
        if isinstance(ev, Heartbeat):
            go_on = run is not None and run.heartbeat(ev, now)
            if msg.reply:
                await answer(msg, CONTINUE if go_on else STOP)
            return
        taken = run is not None and run.offer(ev, now)
        if msg.reply:  # a final DONE asks whether the job is billed (else its worker reports it)
            if run is not None and isinstance(ev, Done) and (taken or run.holds(ev)):
                word = CONTINUE if taken else STOP
                run.answer_when_recorded(lambda: answer(msg, word))
            else:
                await answer(msg, STOP)
        if run is None:
            log.debug("job.unknown_reply", subject=msg.subject)
        elif not taken:
            await stop_attempt(self._nc, ev.node, ev.job_id, ev.attempt, "not the winning attempt")

    async def _on_beat(self, msg: Msg) -> None:
        """A worker's heartbeat for every attempt of this gateway's jobs it runs: each goes to
        its run as a heartbeat would; the answer names those that must stop."""
        try:
            beat = Beat.decode(msg.data)
        except WireError as e:
            log.warning("job.bad_beat", error=str(e))
            return
        now = time.monotonic()
        stopped = tuple(i for i, b in enumerate(beat.attempts) if not self._beats_on(b, beat.node, now))
        if msg.reply:
            await answer(msg, BeatAnswer(stopped).encode())

    def _beats_on(self, b: Beating, node: str, now: float) -> bool:
        run = self._by_token.get(b.token)
        if run is None:
            return False
        if b.attempt // ATTEMPTS_PER_DISPATCH > run.job.dispatch:
            log.warning("job.forged_beat", job_id=run.job.id, node=node, attempt=b.attempt)
            return False
        return run.beat(b.attempt, b.seq, now)


async def stop_attempt(nc: NATS, node: str, job_id: str, attempt: int, reason: str) -> None:
    """Tell `node` to stop `attempt` of `job_id`."""
    if not node:
        return
    with contextlib.suppress(nats.errors.Error):
        await nc.publish(subjects.node_control(node), Stop(job_id, attempt, reason).encode())


async def answer(msg: Msg, word: bytes) -> None:
    with contextlib.suppress(nats.errors.Error):
        await msg.respond(word)
