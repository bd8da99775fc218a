"""Holding admitted jobs durably and releasing them to their work queue as room appears.

A work queue is FIFO and workers pull it as slots free, so the order jobs *enter* it is the
order they run. The scheduler therefore keeps each (pool, model) work queue short: at most a
small buffer of jobs waits there (enough that a worker never idles between two releases), and
the rest waits in the intake stream, released fairest first (`scheduler.fairness`).

- Fast path: a job whose pool has room and no held backlog goes straight to its work queue
  (one JetStream publish, as before).
- Otherwise the job is published to the intake stream (the admission answer waits for that
  ack, so it is durable) and every scheduler pulls the intake from one shared durable consumer
  into its fair queues. A held message stays un-acked (kept alive with `in_progress`) until its
  job was published to the work queue, then it is acked. A scheduler killed -9 leaves its held
  jobs un-acked: JetStream redelivers them to another scheduler after `ack_wait`; a job already
  released is deduplicated by its message id (`<job id>.<dispatch>`).
- Room: the work queue's pending count (polled from its consumer, plus what was released
  since) under `buffer(pool, model)`.

The intake stream is bounded overall and per tenant (one subject per tenant, with
`discard_new_per_subject`): a full queue is a 429 `queue_full` with Retry-After.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from scheduler.fairness import FairQueue, Item
from scheduler.publish import publish_job
from schemas import streams, subjects
from schemas.errors import QueueFullError
from schemas.intake import Queued
from schemas.jetstream import consume, decode_batch, is_full
from schemas.jobs import Job
from schemas.streams import StreamSpec

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT = 5.0
QUEUE_FULL_RETRY_AFTER = 2.0
FETCH_BATCH = 256
TICK = 0.02  # seconds between release rounds while jobs are held
POLL_HELD = 0.1  # seconds between pending polls of a work queue with held jobs
POLL_IDLE = 1.0  # ... of one without
REFUSED_BACKOFF = 1.0  # seconds
FORGET = 30.0  # seconds a (pool, model) with no activity stays polled

Pair = tuple[str, str]  # (pool, model)


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_jobs: int = 100_000
    max_per_tenant: int = 10_000
    ack_wait: float = 30.0

    @property
    def stream(self) -> StreamSpec:
        """The intake stream's entry with these limits."""
        return dataclasses.replace(streams.INTAKE, max_msgs=self.max_jobs, max_msgs_per_subject=self.max_per_tenant)


@dataclass(slots=True)
class _Pending:
    polled: int = 0  # undelivered jobs in the work queue at the last poll
    since: int = 0  # jobs this scheduler put there after that poll
    polled_at: float = 0.0
    active_at: float = 0.0
    refused_until: float = 0.0  # the work queue refused a release: leave it alone until then

    @property
    def estimate(self) -> int:
        return self.polled + self.since


class Releaser:
    def __init__(
        self,
        js: JetStreamContext,
        limits: IntakeLimits,
        *,
        buffer: Callable[[str, str], int],
        on_release: Callable[[str, str, str, float], None] | None = None,
    ) -> None:
        self._js = js
        self._on_release = on_release  # (pool, model, tier, seconds held): for the metrics
        self._lim = limits
        self._buffer = buffer
        self.queues: dict[Pair, FairQueue[tuple[Msg, Job]]] = {}
        self._pending: dict[Pair, _Pending] = {}
        self._wake = asyncio.Event()
        self.released = 0
        self.waits: list[tuple[str, float]] = []  # (tier, seconds held) of recent releases, for stats
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """The intake stream must exist (`IntakeLimits.stream`, ensured by the caller)."""
        self._tasks = [
            asyncio.create_task(f())
            for f in (self._fetch_forever, self._release_forever, self._keep_alive_forever, self._poll_forever)
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- what admission asks ------------------------------------------------------------

    def held(self, pool: str, model: str) -> int:
        q = self.queues.get((pool, model))
        return len(q) if q else 0

    def queued(self, pool: str, model: str) -> int:
        """Jobs ahead of a new one: waiting in the work queue and held here."""
        p = self._pending.get((pool, model))
        return (p.estimate if p else 0) + self.held(pool, model)

    def take_room(self, pool: str, model: str) -> bool:
        """May a job go straight to this work queue? If so its place is taken at once (before
        the publish), so concurrent admissions cannot all pass; `give_back` if it fails."""
        p = self._pending.setdefault((pool, model), _Pending())
        p.active_at = time.monotonic()
        if self.held(pool, model) or p.estimate >= self._buffer(pool, model):
            return False
        p.since += 1
        return True

    def give_back(self, pool: str, model: str) -> None:
        p = self._pending.get((pool, model))
        if p is not None and p.since > 0:
            p.since -= 1

    async def hold(self, queued: Queued) -> None:
        """Durably queue an admitted job; raises QueueFullError when the intake is full, and
        UnavailableError when the intake stream has no leader in time."""
        job = queued.job
        try:
            await publish_job(self._js, subjects.intake_subject(queued.tenant), queued.encode(), msg_id=job.message_id)
        except nats.js.errors.APIError as e:
            if is_full(e):
                raise QueueFullError(
                    "Too many requests are waiting. Try again shortly.", retry_after=QUEUE_FULL_RETRY_AFTER
                ) from e
            raise
        self._pending.setdefault((queued.pool, job.model), _Pending()).active_at = time.monotonic()

    # --- loops --------------------------------------------------------------------------

    async def _fetch_forever(self) -> None:
        config = ConsumerConfig(
            durable_name=subjects.RELEASE_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._lim.ack_wait,
            max_deliver=-1,
            filter_subject=subjects.INTAKE_ALL,
            max_ack_pending=self._lim.max_jobs,
        )
        psub = await self._js.pull_subscribe(
            subjects.INTAKE_ALL, durable=subjects.RELEASE_CONSUMER, stream=subjects.INTAKE_STREAM, config=config
        )
        await consume(psub, self._take, name=subjects.RELEASE_CONSUMER, batch=FETCH_BATCH, wait=0.5)

    async def _take(self, msgs: list[Msg]) -> None:
        """Held jobs join their fair queue; they stay un-acked until released."""
        for msg, q in await decode_batch(msgs, Queued.decode, name=subjects.RELEASE_CONSUMER):
            pair = (q.pool, q.job.model)
            fq = self.queues.get(pair)
            if fq is None:
                fq = self.queues[pair] = FairQueue()
            fq.push(Item((msg, q.job), q.tenant, q.tier, q.admitted))
            self._pending.setdefault(pair, _Pending()).active_at = time.monotonic()
        self._wake.set()

    async def _release_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(TICK if any(self.queues.values()) else 1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.release_round()
            except Exception:  # top of a loop
                log.exception("intake.release_failed")

    async def release_round(self) -> None:
        now = time.time()
        for pair, fq in list(self.queues.items()):
            p = self._pending.setdefault(pair, _Pending())
            if p.refused_until > time.monotonic():
                continue
            room = self._buffer(*pair) - p.estimate
            batch = []
            while room > 0 and len(fq):
                item = fq.pop(now)
                assert item is not None
                msg, job = item.value
                if job.deadline < now:
                    await msg.term()  # its gateway already answered 504
                    continue
                batch.append(item)
                room -= 1
            if batch:
                p.since += len(batch)
                p.active_at = time.monotonic()
                results = await asyncio.gather(*(self._release(pair, item) for item in batch), return_exceptions=True)
                for item, ok in zip(batch, results):
                    if ok is not True:  # the work queue refused it: hold it again, try later
                        p.since -= 1
                        p.refused_until = time.monotonic() + REFUSED_BACKOFF
                        fq.push(item)
            if not fq:
                del self.queues[pair]

    async def _release(self, pair: Pair, item: Item[tuple[Msg, Job]]) -> bool:
        msg, job = item.value
        try:
            await self._js.publish(
                subjects.work_subject(pair[0], job.model),
                job.encode(),
                timeout=PUBLISH_TIMEOUT,
                headers={"Nats-Msg-Id": job.message_id},
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:
            log.warning("intake.release_refused", job_id=job.id, error=str(e))
            return False
        try:
            await msg.ack()
        except nats.errors.Error:
            pass  # redelivered later, then deduplicated by its message id
        self.released += 1
        waited = time.time() - item.since
        if len(self.waits) < 200_000:
            self.waits.append((item.tier, waited))
        if self._on_release is not None:
            self._on_release(pair[0], job.model, item.tier, waited)
        log.debug("job.released", request_id=job.request_id, job_id=job.id, pool=pair[0], tier=item.tier)
        return True

    async def _keep_alive_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lim.ack_wait / 3)
            for fq in list(self.queues.values()):
                for item in fq.items():
                    try:
                        await item.value[0].in_progress()
                    except Exception as e:  # top of a loop: the next round tries again
                        log.warning("intake.keep_alive_failed", error=repr(e))
                        break

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_HELD)
            try:
                await self._poll_once()
            except Exception:  # top of a loop: a dead poller would hold every job forever
                log.exception("intake.poll_failed")

    async def _poll_once(self) -> None:
        now = time.monotonic()
        for pair, p in list(self._pending.items()):
            if now - p.active_at > FORGET and not self.held(*pair):
                del self._pending[pair]
                continue
            busy = self.held(*pair) or p.since  # jobs wait, or went there since the last look
            if now - p.polled_at < (POLL_HELD if busy else POLL_IDLE):
                continue
            before = p.since  # releases made while the answer travels are not in it
            try:
                info = await self._js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(*pair), timeout=1.0)
                p.polled, p.since = info.num_pending, p.since - before
            except nats.js.errors.NotFoundError:
                p.polled = 0  # no worker ever pulled there: what we put there is all there is
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                continue
            p.polled_at = now
            if self.held(*pair):
                self._wake.set()
