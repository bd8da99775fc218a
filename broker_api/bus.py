"""The gateway's NATS edge: submit jobs, route their events to their `JobRun`, stop attempts.

One subscription (`reply_inbox(gateway_id)`) receives the events of every job this gateway
runs; each event goes to the `JobRun` its subject's reply token belongs to (a secret in the
job's envelope: `schemas.subjects.reply_subject`), and only if it speaks of that job and of a
dispatch the gateway made. So a node that learns another job's id cannot inject events into it:
events on an unknown token are dropped without a word (answering them with a stop would let a
forger stop other nodes' jobs). Events of a job this gateway still knows but that lost (the
client left, another attempt won) are answered with a stop, so no worker keeps generating for
nobody; a heartbeat on an unknown token is answered "stop" too (the answer goes only to its
sender). Heartbeats come once per worker and interval for all of this gateway's jobs it runs
(`schemas.beats`, on the same inbox), each attempt named by its job's reply token; the answer
lists the attempts that must stop. A final DONE comes as a request and is always answered (to its sender alone): at once
if it lost, else once the job's usage record is stored. A worker whose DONE is not answered in
time reports the job itself (`schemas.usage.WorkerReport`), so a gateway that dies between the
answer and its record leaves no job unbilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker_api.accounting import PATIENCE
from broker_api.jobrun import JobRun
from broker_api.lanes import Lanes
from schemas import streams, subjects
from schemas.beats import Beat, BeatAnswer, Beating
from schemas.codec import WireError
from schemas.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NoCapacityError,
    RequestTooLargeError,
    from_wire,
)
from schemas.events import Done, Heartbeat, decode_event
from schemas.jobs import (
    ATTEMPTS_PER_DISPATCH,
    CONTINUE,
    STOP,
    Admission,
    ModelAdvert,
    Stop,
    Submission,
    decode_model_list,
)
from schemas.logs import close_quietly
from schemas.settings import NatsSettings, nats_options

log = structlog.get_logger(__name__)

NO_SCHEDULER_RETRY_AFTER = 5.0
RECORD_WAIT = PATIENCE + 10.0  # seconds a closed job's events are still heard while its record is retried


class Bus:
    def __init__(self, nc: NATS, gateway_id: str, lanes: Lanes) -> None:
        self.nc = nc
        self.gateway_id = gateway_id
        self.lanes = lanes
        self.runs: dict[str, JobRun] = {}
        self._by_token: dict[str, JobRun] = {}  # reply token -> its job's run

    @classmethod
    async def connect(cls, settings: NatsSettings, *, lanes: bool = True) -> Bus:
        """Connected, and subscribed to this gateway's events; `lanes`: use the lanes schedulers grant."""
        gateway_id = uuid.uuid4().hex[:12]
        nc = await nats.connect(**nats_options(settings, name=f"tokenyard-api-{gateway_id}"))
        bus = cls(nc, gateway_id, Lanes(nc.jetstream(), enabled=lanes))
        await nc.subscribe(subjects.reply_inbox(gateway_id), cb=bus._on_event)
        return bus

    async def close(self) -> None:
        for run in self.runs.values():
            run.close()
        await close_quietly(self.nc)

    def reply_subject(self, job_id: str) -> str:
        """A fresh reply subject for `job_id`'s events (its token is registered by `open_run`)."""
        return subjects.reply_subject(self.gateway_id, subjects.new_reply_token())

    # --- events -------------------------------------------------------------------------

    async def _on_event(self, msg: Msg) -> None:
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
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(CONTINUE if go_on else STOP)
            return
        taken = run is not None and run.offer(ev, now)
        if msg.reply:  # a final DONE asks whether the job is billed (else its worker reports it)
            if run is not None and isinstance(ev, Done) and (taken or run.holds(ev.attempt)):
                word = CONTINUE if taken else STOP
                run.answer_when_recorded(lambda: _answer(msg, word))
            else:
                await _answer(msg, STOP)
        if run is None:
            log.debug("job.unknown_reply", subject=msg.subject)
        elif not taken:
            await self.stop(ev.node, ev.job_id, ev.attempt, "not the winning attempt")

    async def _on_beat(self, msg: Msg) -> None:
        """A worker's heartbeat for every attempt of this gateway's jobs it runs: each goes to
        its run as a heartbeat would; the answer names those that must stop."""
        try:
            beat = Beat.decode(msg.data)
        except WireError as e:
            log.warning("job.bad_beat", error=str(e))
            return
        now = time.monotonic()
        stop = tuple(i for i, b in enumerate(beat.attempts) if not self._beats_on(b, beat.node, now))
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(BeatAnswer(stop).encode())

    def _beats_on(self, b: Beating, node: str, now: float) -> bool:
        run = self._by_token.get(b.token)
        if run is None:
            return False
        if b.attempt // ATTEMPTS_PER_DISPATCH > run.job.dispatch:
            log.warning("job.forged_beat", job_id=run.job.id, node=node, attempt=b.attempt)
            return False
        return run.beat(b.attempt, b.seq, now)

    async def stop(self, node: str, job_id: str, attempt: int, reason: str) -> None:
        if not node:
            return
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subjects.node_control(node), Stop(job_id, attempt, reason).encode())

    # --- scheduler ----------------------------------------------------------------------

    async def submit(self, sub: Submission, *, timeout: float, deadline: float) -> Admission:
        """Place a job through its lane if a scheduler granted one (`broker_api.lanes`), else
        hand it to a scheduler; retries a lost answer with the same job (deduplicated). A job
        too large for one NATS message is refused (413) before anything is queued."""
        data = encoded_submission(sub, max_payload=self.nc.max_payload)
        lane = self.lanes.key_of(sub)
        if lane is not None:
            placed = await self.lanes.place(lane, sub)
            if placed is not None:
                return placed
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceededError("No scheduler accepted the request before its deadline.")
            try:
                reply = await self.nc.request(subjects.SCHED_SUBMIT, data, timeout=min(timeout, remaining))
            except nats.errors.NoRespondersError as e:
                raise NoCapacityError("No scheduler is running.", retry_after=NO_SCHEDULER_RETRY_AFTER) from e
            except nats.errors.TimeoutError:
                log.warning("job.submit_retry", job_id=sub.job.id)
                continue
            answer = Admission.decode(reply.data)
            if answer.error is not None:
                raise from_wire(answer.error)
            if lane is not None:
                self.lanes.grant(lane, answer)
            return answer

    async def models(self, timeout: float = 2.0) -> list[ModelAdvert]:
        try:
            reply = await self.nc.request(subjects.SCHED_MODELS, b"", timeout=timeout)
        except nats.errors.NoRespondersError as e:
            raise NoCapacityError("No scheduler is running.", retry_after=NO_SCHEDULER_RETRY_AFTER) from e
        except nats.errors.TimeoutError as e:
            raise DeadlineExceededError("The scheduler did not answer in time.") from e
        return decode_model_list(reply.data)

    async def ready(self) -> bool:
        if not self.nc.is_connected:
            return False
        try:
            await self.nc.request(subjects.SCHED_PING, b"", timeout=1.0)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return True

    # --- runs ---------------------------------------------------------------------------

    def open_run(self, run: JobRun) -> None:
        """Route the job's events to `run` from now on."""
        self.runs[run.job.id] = run
        self._by_token[subjects.reply_token(run.job.reply)] = run

    async def close_run(self, run: JobRun, reason: str) -> None:
        """Forget a job; stop its attempt if it is still going."""
        run.close()
        self.runs.pop(run.job.id, None)
        token = subjects.reply_token(run.job.reply)
        if run.awaiting_record:  # until then, a delivery of the job again is answered as its winner
            run.when_recorded(lambda: self._by_token.pop(token, None))
            asyncio.get_running_loop().call_later(RECORD_WAIT, self._by_token.pop, token, None)  # if never
        else:
            self._by_token.pop(token, None)
        gone = run.drop_current()
        if gone is not None and not run.finished:
            await self.stop(gone[1], run.job.id, gone[0], reason)


def encoded_submission(sub: Submission, *, max_payload: int) -> bytes:
    """The submission's bytes: a 400 if the request holds what the envelope cannot (the body
    reader refuses that first: `broker_api.body`), a 413 naming the limit if it does not fit in
    one message (the job, and the submission around it, each travel as one)."""
    try:
        data = sub.encode()
    except WireError as e:
        raise InvalidRequestError(f"The request cannot be queued: {e}.") from e
    limit = min(max_payload, streams.MAX_JOB_BYTES)
    if len(data) > limit:
        raise RequestTooLargeError(
            f"The request is {len(data)} bytes as a job, more than the {limit} bytes one job may have "
            "(the message limit of the queue). Shorten the messages.",
            param="messages",
        )
    return data


async def _answer(msg: Msg, word: bytes) -> None:
    with contextlib.suppress(nats.errors.Error):
        await msg.respond(word)
