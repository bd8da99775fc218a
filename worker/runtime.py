"""The worker loop: advertise, pull a job only when a slot is free, run it, stream it, ack it.

One `Worker` per process. I/O with NATS lives here; what a job produces comes from the
backend (`worker.backend`), how it is framed from `worker.events`.

Who ends a job, and how its JetStream message is settled:
- the backend finishes: DONE event, then `ack` once the job's usage record or the worker's
  own report of it is stored (`worker.reports`: the message is the job's record till then);
- the backend fails: ERROR event (retryable unless it was the request's fault), then `term`:
  the gateway, not JetStream, decides whether to dispatch it again;
- a gateway says stop (client gone, another attempt won, the attempt given up on): the
  generation is closed, a DONE whose finish reasons are `cancelled` reports what ran until then
  (the gateway bills a cancelled request from it), sent as a request like a final DONE, then
  `ack` once it is answered, or once the worker's own report is stored if no answer comes: a
  gateway answers an attempt whose output reached its client only once the job's record is
  stored, so a gateway that dies while a continuation carries the answer on still leaves the
  job billed;
- the gateway is gone (its beat finds no responder, or none of its beats is answered for
  `--gateway-patience`: `worker.beats`): the generation is closed, the worker reports what it
  generated (`worker.reports`: the job is billed from that, `counted_by: "worker"`), then `term` once
  the report is stored;
- the final DONE (sent as a request, which the gateway answers once the job's usage record is
  stored) is not answered within `BILLED_WAIT`: the job is reported the same way (waited for
  in the background: the slot is free at once), since a gateway killed after the answer but
  before its record was stored leaves nobody else to bill it;
- the worker dies: nothing is sent; JetStream redelivers after `ack_wait` (a new attempt),
  also a job that finished but whose billing was not settled yet: its new attempt finds the
  gateway gone and reports it, or is told to stop by a gateway that bills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from schemas import subjects
from schemas.codec import WireError
from schemas.errors import NoCapacityError, TokenyardError, WorkerFailedError
from schemas.events import CANCELLED, FinishReason, Piece
from schemas.jobs import Job, NodeAdvert, Stop
from schemas.nodes import NOTHING_SERVED, Hardware
from schemas.otel import Tracing
from schemas.tasks import choices
from worker.backend import Backend, Finish, Usage
from worker.beats import GATEWAY_GONE, GATEWAY_SILENT, Beats, RunKey, beat_alone, patience
from worker.events import EventStream
from worker.feed import Feed
from worker.feed import expiry as feed_expiry
from worker.identity import Signer
from worker.idle import AlwaysAvailable, Availability, hand_back
from worker.metrics import WorkerMetrics
from worker.reports import Reporter
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

# What a stream between leaders answers a consumer look-up with (a NATS node died).
ELECTION = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)

BILLED_WAIT = 10.0  # seconds at least a final DONE waits for the gateway to say the job is billed

START_DELAY = 0.05  # a job with no event within this long tells the gateway it started

# Why a job stopped early, besides the gateway's own reasons (which it sends with its stop).
SHUTDOWN = "shutdown"
OWNER_BACK = "owner back"  # idle-time mode: the machine's owner is using it again
# Stops that give the job back: a retryable error, re-dispatched if no token reached the client.
HANDED_BACK = {
    SHUTDOWN: "the worker shut down before this job finished",
    OWNER_BACK: "the node's owner needed the machine back before this job finished",
}


@dataclass(slots=True)
class Running:
    """A job's attempt this worker runs now. Attempts are kept apart: after a re-dispatch the
    same worker may pull the job again while its earlier attempt is still being stopped, and a
    stop meant for the one must never end the other."""

    attempt: int
    task: asyncio.Task[None]
    out: EventStream
    stop_reason: str = ""  # set when the worker stops it (why), before its task is cancelled


class Worker:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        backend: Backend,
        settings: WorkerSettings,
        *,
        idle: Availability | None = None,
        hardware: Hardware | None = None,
        metrics: WorkerMetrics,
        tracing: Tracing,
        signer: Signer,
    ) -> None:
        """`idle`: idle-time mode (`worker.idle`; default: always available). `hardware`: what
        the adverts say this machine is (`worker.hardware`). `metrics`, `tracing`: what it counts and
        traces (`worker.metrics`, `schemas.otel`). `signer`: proves its attempts
        were this node's (`worker.identity`)."""
        self._nc = nc
        self._signer = signer
        self._metrics = metrics
        self._tracing = tracing
        self._js = js
        self._backend = backend
        self._s = settings
        self._total = backend.slots
        self._feeds: list[Feed] = []
        self._topping = False
        self._running: dict[RunKey, Running] = {}
        self._draining = False
        self._started = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._job_tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones
        self._healthy, self._health_since = True, 0.0
        self._idle = idle or AlwaysAvailable()
        self._hardware = hardware
        self._served = NOTHING_SERVED
        self._reports = Reporter(js, node=settings.node_id, pool=settings.pool, ack_wait=settings.ack_wait)
        self._patience = patience(settings.heartbeat, settings.gateway_patience)
        self._beats = Beats(
            nc,
            node=settings.node_id,
            interval=settings.heartbeat,
            ack_wait=settings.ack_wait,
            patience=self._patience,
            stop=self._stop,
        )
        self._health_told: tuple[bool, tuple[bool, ...]] = (True, ())  # as the last advert said
        # How long a final DONE waits (in the background, its slot free) for the gateway's word
        # that the job's usage record is stored, before the worker reports the job itself.
        self._done_wait = max(10 * settings.heartbeat, BILLED_WAIT)

    @property
    def running_jobs(self) -> int:
        return len(self._running)

    @property
    def draining(self) -> bool:
        return self._draining

    def advert(self) -> NodeAdvert:
        return NodeAdvert(
            node=self._s.node_id,
            pool=self._s.pool,
            models=tuple(self._backend.models()),
            slots_total=self._total,
            slots_free=max(0, self._total - len(self._job_tasks)),
            draining=self._draining or not self._idle.may_pull(),
            interval=self._s.heartbeat,
            started=self._started,
            kind=self._s.kind,
            healthy=self._backend_healthy(),
            health_since=self._health_since,
            paused=not self._draining and not self._idle.may_pull(),  # shutting down is not a pause
            hardware=self._hardware,
            served=self._served,
        )

    def _backend_healthy(self) -> bool:
        """What the backend says (a cloud adapter whose provider is down is not). A change is
        stamped once (`health_since`), so every gateway audits it as one event."""
        healthy = self._backend.healthy()
        if healthy != self._healthy:
            self._healthy, self._health_since = healthy, time.time()
        return healthy

    async def start(self) -> None:
        await self._nc.subscribe(subjects.node_control(self._s.node_id), cb=self._on_control)
        await self._nc.subscribe(subjects.FLEET_ROLL_CALL, cb=self._on_roll_call)
        self._tasks.append(asyncio.create_task(self._advertise_forever()))
        self._tasks.append(asyncio.create_task(self._beats.run()))
        models = sorted({m.id for m in self._backend.models()})
        for model in models:
            await self._ensure_consumer(model)
            feed = Feed(self._nc, subjects.work_consumer(self._s.pool, model), self._accept, then=self._top_up)
            await feed.start()
            self._feeds.append(feed)
        self._tasks.append(asyncio.create_task(self._keep_pulling()))
        self._tasks.append(asyncio.create_task(self._follow_owner()))
        await self._top_up()
        log.info("worker.started", node=self._s.node_id, pool=self._s.pool, models=models, slots=self._total)

    async def drain(self) -> None:
        """Stop pulling, let running jobs finish within the drain timeout, stop the rest."""
        self._draining = True
        log.info("worker.draining", running=len(self._running))
        await self._publish_advert()
        deadline = time.monotonic() + self._s.drain_timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for key in list(self._running):
            self._stop(key, SHUTDOWN)
        while self._running and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for feed in self._feeds:
            await feed.stop()
        await self._reports.drain()
        await self._publish_advert()
        log.info("worker.drained")

    # --- fleet presence -----------------------------------------------------------------

    async def _publish_advert(self) -> None:
        advert = self.advert()
        self._health_told = _health_of(advert)
        with contextlib.suppress(nats.errors.Error):
            await self._nc.publish(subjects.fleet_heartbeat(self._s.node_id), advert.encode())

    async def _tell_health_change(self) -> None:
        """Advertise at once when the node's or a model's health changed (a cloud adapter whose
        provider just timed out twice for a model): schedulers avoid it from the next job on,
        not from the next regular advert."""
        if _health_of(self.advert()) != self._health_told:
            await self._publish_advert()

    async def _advertise_forever(self) -> None:
        while True:
            await self._publish_advert()
            await asyncio.sleep(self._s.heartbeat)

    async def _on_roll_call(self, msg: Msg) -> None:
        await self._publish_advert()

    # --- pulling ------------------------------------------------------------------------

    async def _ensure_consumer(self, model: str) -> None:
        """Bind to (or create) the model's shared consumer; waits for the stream to exist, and
        for a leader of it: a worker started while a NATS node of three is down (the stream
        between leaders: the consumer look-up times out or finds no responder) asks again
        instead of exiting (a clean-checkout CI run lost its second worker, and so the job it
        was to report, that way)."""
        config = ConsumerConfig(
            durable_name=subjects.work_consumer(self._s.pool, model),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._s.ack_wait,
            max_deliver=self._s.max_deliver,
            filter_subject=subjects.work_subject(self._s.pool, model),
            max_waiting=4096,
            # No cap of its own (JetStream's default, 1,000, capped a whole pool's model at 1,000 running
            # jobs): workers pull only for free slots, and admission bounds what waits.
            max_ack_pending=-1,
        )
        for attempt in range(10**6):  # until the stream exists (the scheduler creates it)
            try:
                psub = await self._js.pull_subscribe(
                    config.filter_subject or "", durable=config.durable_name, stream=subjects.WORK_STREAM, config=config
                )
                await psub.unsubscribe()  # only the consumer was wanted; jobs come through a Feed
                return
            except nats.js.errors.NotFoundError:
                if attempt % 10 == 0:
                    log.info("worker.waiting_for_stream", stream=subjects.WORK_STREAM)
            except ELECTION as e:
                log.info("worker.waiting_for_stream_leader", stream=subjects.WORK_STREAM, error=repr(e))
            await asyncio.sleep(0.5)

    async def _top_up(self) -> None:
        """Keep pull requests standing for every free slot (shared fairly between models)."""
        if self._draining or self._topping or not self._idle.may_pull():
            return
        self._topping = True
        try:
            free = self._total - len(self._job_tasks) - sum(f.outstanding for f in self._feeds)
            share = max(1, self._total // max(1, len(self._feeds)))
            # sized by the slots free to ask with: those are what rotate through the models
            expires = feed_expiry(max(1, self._total - len(self._job_tasks)), len(self._feeds))
            for feed in sorted(self._feeds, key=lambda f: (f.outstanding, f.asked)):
                want = min(free, share - feed.outstanding)
                # ask in batches, not per slot, unless the feed has nothing standing at all
                if want > 0 and (feed.outstanding == 0 or want >= max(1, share // 4)):
                    await feed.request(want, expires)
                    free -= want
        finally:
            self._topping = False

    async def _keep_pulling(self) -> None:
        """Re-ask when requests were lost without a word (a reconnect), and top up regularly."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for feed in self._feeds:
                feed.forget_if_stale(now)
            await self._top_up()

    def _accept(self, msg: Msg) -> None:
        if self._draining or not self._idle.may_pull():
            asyncio.ensure_future(msg.nak())  # another worker takes it now
            return
        task = asyncio.create_task(self._run(msg))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._job_tasks.discard(task)
        asyncio.ensure_future(self._tell_health_change())
        asyncio.ensure_future(self._top_up())

    # --- one job ------------------------------------------------------------------------

    async def _run(self, msg: Msg) -> None:
        structlog.contextvars.clear_contextvars()  # this task's own context: its job's ids only
        try:
            job = Job.decode(msg.data)
        except WireError as e:
            log.error("job.malformed", error=str(e))
            await msg.term()
            return
        attempt = job.attempt_id(msg.metadata.num_delivered)
        structlog.contextvars.bind_contextvars(
            request_id=job.request_id, job_id=job.id, model=job.model, attempt=attempt
        )
        try:
            with self._tracing.span("worker.job", job.traceparent, job_id=job.id, model=job.model, attempt=attempt):
                await self._serve(msg, job, attempt)
        except Exception:  # top of a task: never let one job take the worker down
            log.exception("job.crashed")

    async def _serve(self, msg: Msg, job: Job, attempt: int) -> None:
        pulled = time.monotonic()
        self._metrics.pulled(job.model, time.time() - msg.metadata.timestamp.timestamp())
        if job.deadline < time.time():
            log.info("job.expired")
            self._metrics.ended(job.model, "expired", tokens=0, seconds=0.0)
            await msg.term()
            return
        out = EventStream(
            self._nc,
            job.reply,
            job_id=job.id,
            attempt=attempt,
            node=self._s.node_id,
            coalesce=self._s.coalesce_ms / 1000,
            proof=self._signer.prove(job.id, attempt, self._s.node_id),
            first_at_once=job.streamed,
        )
        task = asyncio.current_task()
        assert task is not None
        started = time.time()
        key = (job.id, attempt)
        running = self._running[key] = Running(attempt, task, out)
        alone: asyncio.Task[None] | None = None  # the heartbeat of a job whose gateway reads no beats
        if job.beats and subjects.reply_gateway(job.reply):
            self._beats.add(key, msg, job.reply, out)
        else:
            beating = beat_alone(
                self._nc,
                msg,
                job.reply,
                key,
                out,
                interval=self._s.heartbeat,
                patience=self._patience,
                stop=self._stop,
            )
            alone = asyncio.create_task(beating)
        settle = msg.term
        outcome = "failed"
        try:
            out.start(START_DELAY)
            log.debug("job.started")
            await self._generate(job, attempt, out, started, msg)
            settle, outcome = _settled_by_reporter, "done"
            log.info("job.done", tokens=out.tokens_sent, duration_ms=round((time.monotonic() - pulled) * 1e3, 3))
        except asyncio.CancelledError:
            reason = running.stop_reason
            if not reason:
                raise
            # forgotten at once: a second stop must not cancel the report or the term below
            self._running.pop(key, None)
            if reason in HANDED_BACK:
                await out.fail(NoCapacityError(HANDED_BACK[reason]), retryable=True)
            elif reason in (GATEWAY_GONE, GATEWAY_SILENT):  # nobody listens: report it for billing
                usage = self._backend.partial_usage(job.model, job.request, out.tokens)
                proof = self._signer.prove(job.id, attempt, self._s.node_id)
                self._reports.report(
                    job, attempt, usage, msg=msg, started=started, finished=False, reason=reason, proof=proof
                )
                settle = _settled_by_reporter  # once the report is stored
            else:  # someone listens: say what ran, and keep the job's record till it is billed
                self._report_stopped(job, attempt, out, msg=msg, started=started, reason=reason)
                settle = _settled_by_reporter
            outcome = "stopped"
            log.info("job.stopped", reason=reason, tokens=out.tokens)
        except TokenyardError as e:
            # a failure may have taken a model out (a cloud adapter's provider timing out): say
            # so before the gateway, told of the failure, asks a scheduler to place the job again
            await self._tell_health_change()
            await out.fail(e, retryable=e.status >= 500)
            log.info("job.failed", status=e.status, error=e.message)
        except Exception as e:
            log.exception("job.failed")
            await out.fail(WorkerFailedError(f"the worker failed: {type(e).__name__}"), retryable=True)
        finally:
            out.cancel_start()
            self._beats.discard(key)
            if alone is not None:
                alone.cancel()
            self._running.pop(key, None)
            self._metrics.ended(job.model, outcome, tokens=out.tokens, seconds=time.monotonic() - pulled)
            with contextlib.suppress(nats.errors.Error):
                await settle()

    async def _generate(self, job: Job, attempt: int, out: EventStream, started: float, msg: Msg) -> None:
        self._backend.check(job.model, job.request)
        n = choices(job.request)
        finish: list[FinishReason] = ["stop"] * n
        usage: Usage | None = None
        gen = self._backend.generate(job.model, job.request)
        try:
            async for item in gen:
                if isinstance(item, Piece):
                    await out.add(item)
                elif isinstance(item, Finish):
                    finish[item.index] = item.reason
                else:
                    usage = item
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        if usage is None:
            raise WorkerFailedError("the backend ended without reporting usage")
        heard = out.billed(finish, usage, within=self._done_wait)
        proof = self._signer.prove(job.id, attempt, self._s.node_id)
        reason = "done unanswered"
        self._reports.unless(heard, job, attempt, usage, msg=msg, started=started, reason=reason, proof=proof)
        self._served = self._served.plus(usage.prompt_tokens, usage.completion_tokens)

    def _report_stopped(
        self, job: Job, attempt: int, out: EventStream, *, msg: Msg, started: float, reason: str
    ) -> None:
        """The gateway stopped this attempt: send what it used so far (prompt, the tokens
        generated, their cost), so a client that left is billed what ran; if the gateway still
        waits for it, it bills from this, if not, it drops it. The count goes as a request,
        like a final DONE's: a gateway that gave up on this attempt after its output reached the
        client answers only once the job's record is stored (`broker_api.jobrun.JobRun.holds`),
        which may be as late as the job's deadline; if no answer comes (that gateway died),
        the worker reports the job, and the message stays its record till then."""
        n = choices(job.request)
        usage = self._backend.partial_usage(job.model, job.request, out.tokens)
        within = max(self._done_wait, job.deadline - time.time() + self._done_wait)
        heard = out.billed([CANCELLED] * n, usage, within=within)
        proof = self._signer.prove(job.id, attempt, self._s.node_id)
        self._reports.unless(
            heard,
            job,
            attempt,
            usage,
            msg=msg,
            started=started,
            reason=f"stopped ({reason}), unanswered",
            proof=proof,
            finished=False,
        )

    async def _follow_owner(self) -> None:
        """Idle-time mode: when the owner is back, stop pulling at once (the standing pull
        requests die with their feed's inbox, so queued jobs go to other nodes), say so, and
        hand the running jobs back (`worker.idle.hand_back`); pull again once idle."""
        while True:
            await self._idle.wait_for(idle=False)
            for feed in self._feeds:
                await feed.stop()
            log.info("worker.paused", running=len(self._running))
            await self._publish_advert()
            await hand_back(
                self._idle,
                lambda: {_label(key): r.out.tokens for key, r in self._running.items()},
                lambda label: self._stop(_unlabel(label), OWNER_BACK),
                grace=self._s.idle_grace,
            )
            await self._idle.wait_for(idle=True)
            for feed in self._feeds:
                await feed.start()
            log.info("worker.resumed")
            await self._publish_advert()
            await self._top_up()

    def _stop(self, key: RunKey, reason: str) -> None:
        running = self._running.get(key)
        if running is None or running.stop_reason:
            return
        running.stop_reason = reason
        running.task.cancel()

    async def _on_control(self, msg: Msg) -> None:
        try:
            stop = Stop.decode(msg.data)
        except WireError as e:
            log.warning("worker.bad_control", error=str(e))
            return
        for job_id, attempt in list(self._running):
            if job_id == stop.job_id and stop.attempt in (0, attempt):  # 0: every attempt of the job
                self._stop((job_id, attempt), stop.reason or "stopped")


async def _settled_by_reporter() -> None:
    """The work message of a job whose billing is not settled yet: the reporter acks it once
    it is (`worker.reports`), so it stays JetStream's record of the job meanwhile."""


def _health_of(advert: NodeAdvert) -> tuple[bool, tuple[bool, ...]]:
    return advert.healthy, tuple(m.healthy for m in advert.models)


def _label(key: RunKey) -> str:
    return f"{key[0]}/{key[1]}"


def _unlabel(label: str) -> RunKey:
    job_id, _, attempt = label.rpartition("/")
    return job_id, int(attempt)
