"""The gateway's NATS edge: submit jobs, route their events to their `JobRun`, stop attempts.

One subscription (`reply_inbox(gateway_id)`) receives the events and beats of every job this
gateway runs; its handler, `broker_api.inbox.Inbox`, hands each to the job's run by its secret
reply token. `unread` is how many of them wait in that subscription, not handled yet: a
gateway whose loop is behind has its workers' words there (`broker_api.attempts` does not take
an attempt for silent meanwhile).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from broker_api.inbox import Inbox, stop_attempt
from broker_api.jobrun import JobRun
from broker_api.lanes import Lanes
from schemas import streams, subjects
from schemas.codec import WireError
from schemas.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NoCapacityError,
    RequestTooLargeError,
    from_wire,
)
from schemas.jobs import Admission, ModelAdvert, Submission, decode_model_list
from schemas.logs import close_quietly
from schemas.settings import NatsSettings, nats_options

log = structlog.get_logger(__name__)

NO_SCHEDULER_RETRY_AFTER = 5.0


class Bus:
    def __init__(self, nc: NATS, gateway_id: str, lanes: Lanes, inbox: Inbox, reading: Subscription) -> None:
        self.nc = nc
        self.gateway_id = gateway_id
        self.lanes = lanes
        self._inbox = inbox
        self._reading = reading  # the inbox subscription, `inbox.on_message` its handler

    @classmethod
    async def connect(cls, settings: NatsSettings, *, lanes: bool = True) -> Bus:
        """Connected, and subscribed to this gateway's events; `lanes`: use the lanes schedulers grant."""
        gateway_id = uuid.uuid4().hex[:12]
        nc = await nats.connect(**nats_options(settings, name=f"tokenyard-api-{gateway_id}"))
        routes = Inbox(nc)
        reading = await nc.subscribe(subjects.reply_inbox(gateway_id), cb=routes.on_message)
        return cls(nc, gateway_id, Lanes(nc.jetstream(), enabled=lanes), routes, reading)

    async def close(self) -> None:
        for run in self._inbox.runs.values():
            run.close()
        await close_quietly(self.nc)

    @property
    def unread(self) -> int:
        """Events and beats in this gateway's inbox not handled yet: its loop, or the handling,
        is behind, and its workers' words wait there."""
        return self._reading.pending_msgs

    def reply_subject(self, job_id: str) -> str:
        """A fresh reply subject for `job_id`'s events (its token is registered by `open_run`)."""
        return subjects.reply_subject(self.gateway_id, subjects.new_reply_token())

    async def stop(self, node: str, job_id: str, attempt: int, reason: str) -> None:
        await stop_attempt(self.nc, node, job_id, attempt, reason)

    # --- scheduler ----------------------------------------------------------------------

    async def submit(self, sub: Submission, *, timeout: float, deadline: float, run: JobRun | None = None) -> Admission:
        """Place a job through its lane if a scheduler granted one (`broker_api.lanes`), else
        hand it to a scheduler; retries a lost answer with the same job (deduplicated). A job
        too large for one NATS message is refused (413) before anything is queued. A retry
        after `run` (the job's, open) heard from an attempt of this dispatch says so
        (`Submission.started`): the job is placed, although its scheduler never answered."""
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
                if run is not None and not sub.started and run.heard_from(sub.job.dispatch):
                    sub = dataclasses.replace(sub, started=True)
                    data = encoded_submission(sub, max_payload=self.nc.max_payload)
                log.warning("job.submit_retry", job_id=sub.job.id, started=sub.started)
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
        self._inbox.open(run)

    async def close_run(self, run: JobRun, reason: str) -> None:
        """Forget a job; stop its attempt if it is still going."""
        run.close()
        self._inbox.close(run)
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
