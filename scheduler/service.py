"""The scheduler's NATS edge: keep the work stream, watch the fleet, admit and place jobs.

Each submission is a core request on `SCHED_SUBMIT` (queue group: one scheduler of many
answers). The answer is sent only after JetStream acknowledged the job, so "accepted" means
durable. The job's message id is `<job id>.<dispatch>`: a gateway that retries after a lost
answer gets the same placement deduplicated, never a second run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas import subjects
from schemas.errors import InvalidRequestError, QueueFullError, TokenyardError
from schemas.jobs import Admission, NodeAdvert, Submission, WireError, encode_model_list
from scheduler.fleet import Fleet
from scheduler.placement import choose_pool
from scheduler.settings import SchedulerSettings

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT = 5.0
QUEUE_FULL_RETRY_AFTER = 2.0
DUPLICATE_WINDOW = 120.0
MAX_JOB_BYTES = 1 << 20


def work_stream_config(s: SchedulerSettings) -> StreamConfig:
    return StreamConfig(
        name=subjects.WORK_STREAM,
        subjects=[subjects.WORK_ALL],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_msgs=s.queue_max_jobs,
        max_bytes=s.queue_max_bytes,
        max_age=s.queue_max_age,
        max_msg_size=MAX_JOB_BYTES,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=s.replicas,
    )


async def ensure_work_stream(js: JetStreamContext, s: SchedulerSettings) -> None:
    config = work_stream_config(s)
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)  # exists with other limits: the operator's new ones win


class Scheduler:
    def __init__(self, nc: NATS, js: JetStreamContext, settings: SchedulerSettings) -> None:
        self._nc = nc
        self._js = js
        self._s = settings
        self.fleet = Fleet(remember=settings.remember_models)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await ensure_work_stream(self._js, self._s)
        await self._nc.subscribe(subjects.FLEET_HEARTBEAT_ALL, cb=self._on_advert)
        await self._nc.publish(subjects.FLEET_ROLL_CALL, b"")
        await self._nc.flush()
        await asyncio.sleep(0.2)  # let roll-call answers arrive before the first placement
        await self._nc.subscribe(subjects.SCHED_SUBMIT, queue=subjects.SCHEDULER_QUEUE_GROUP, cb=self._on_submit)
        await self._nc.subscribe(subjects.SCHED_MODELS, queue=subjects.SCHEDULER_QUEUE_GROUP, cb=self._on_models)
        await self._nc.subscribe(subjects.SCHED_PING, queue=subjects.SCHEDULER_QUEUE_GROUP, cb=self._on_ping)
        self._tasks.append(asyncio.create_task(self._prune_forever()))
        log.info("scheduler.started")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.fleet.prune(time.time())

    async def _on_advert(self, msg: Msg) -> None:
        try:
            self.fleet.observe(NodeAdvert.decode(msg.data), time.time())
        except WireError as e:
            log.warning("fleet.bad_advert", subject=msg.subject, error=str(e))

    async def _on_models(self, msg: Msg) -> None:
        await msg.respond(encode_model_list(self.fleet.models(time.time())))

    async def _on_ping(self, msg: Msg) -> None:
        await msg.respond(b"pong")

    async def _on_submit(self, msg: Msg) -> None:
        try:
            answer = await self._admit(msg.data)
        except TokenyardError as e:
            answer = Admission(error=e.to_wire())
        except Exception as e:  # top of a handler: answer, log, keep serving
            log.exception("job.admit_crashed")
            answer = Admission(error=TokenyardError(f"scheduler error: {type(e).__name__}").to_wire())
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(answer.encode())

    async def _admit(self, data: bytes) -> Admission:
        try:
            sub = Submission.decode(data)
        except WireError as e:
            raise InvalidRequestError(f"malformed submission: {e}") from e
        now = time.time()
        job = sub.job
        placement = choose_pool(job.model, self.fleet.pools_for(job.model, now), known=self.fleet.known(job.model),
                                avoid=sub.avoid)
        payload = job.encode()
        if len(payload) > MAX_JOB_BYTES:
            raise InvalidRequestError("The request is too large to queue.", code="request_too_large")
        try:
            await self._js.publish(subjects.work_subject(placement.pool, job.model), payload,
                                   timeout=PUBLISH_TIMEOUT, headers={"Nats-Msg-Id": f"{job.id}.{job.dispatch}"})
        except nats.js.errors.APIError as e:
            if "maximum" in (e.description or ""):
                raise QueueFullError("The queue for this model is full. Try again shortly.",
                                     retry_after=QUEUE_FULL_RETRY_AFTER) from e
            raise
        log.info("job.enqueued", job_id=job.id, model=job.model, pool=placement.pool, dispatch=job.dispatch)
        return Admission(pool=placement.pool, live_workers=placement.live_nodes)
