"""The scheduler's NATS edge: keep the work stream, watch the fleet, admit and place jobs.

Each submission is a core request on `SCHED_SUBMIT` (queue group: one scheduler of many
answers). The answer is sent only after JetStream acknowledged the job, so "accepted" means
durable. The job's message id is `<job id>.<dispatch>`: a gateway that retries after a lost
answer gets the same placement deduplicated, never a second run.

Lanes: a round trip through a scheduler is a good part of what a request costs. When a job
of a key with no limits went straight to a work queue that has room, nothing waits that it
could jump ahead of, and its placement would be the same for the next jobs of that key and
model, the answer grants the gateway a lane: up to `lane_credits` more such jobs may go
straight to that queue within `lane_ttl` seconds, as many as the pool has idle slots beyond
what is queued for it (so lane jobs start at once; credits are not set aside as room, which
would hold back other keys' jobs for credits a lane may never use). The gateway publishes with
the same message ids, and anything a lane cannot place (ended, refused) comes back through a
normal submission. Once the pool is busy, the work queue's pending count shows it and no new
lane is granted; one already granted adds at most its credits, for at most `lane_ttl`. Never
for limited keys (every request must be counted here), a `provider` object or `models` list,
a re-dispatch, a weighted split (each request draws), or a pool whose breaker is not closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
import uuid
from collections import OrderedDict

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from scheduler import limits as L
from scheduler import quota, routing
from scheduler.fleet import Fleet
from scheduler.health import BreakerConfig, Health
from scheduler.metrics import SchedulerMetrics
from scheduler.nodes import NodeGate
from scheduler.placements import Claim, Placements
from scheduler.publish import publish_job
from scheduler.quota import Quota
from scheduler.release import IntakeLimits, Releaser
from scheduler.routing_store import RoutingStore
from scheduler.settings import SchedulerSettings
from scheduler.settle import Settler
from schemas import streams, subjects
from schemas.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NoCapacityError,
    QueueFullError,
    TokenyardError,
    UnavailableError,
)
from schemas.intake import Queued
from schemas.jetstream import ensure, is_full, open_bucket
from schemas.jobs import Admission, Job, NodeAdvert, Submission, WireError, encode_model_list
from schemas.otel import Tracing
from schemas.placements import PLACING, Placement
from schemas.rules import check_max_tokens, estimate_prompt_tokens, lane_eligible, requested_max_tokens
from schemas.settings import replicas_setting
from schemas.streams import StreamSpec
from schemas.usage import UsageRecord

log = structlog.get_logger(__name__)

QUEUE_FULL_RETRY_AFTER = 2.0
UNAVAILABLE_RETRY_AFTER = 2.0  # seconds: a stream or bucket between leaders has one again in a few
# Seconds after start (once it serves) in which a model with no route waits to be heard of: the
# roll call's answers and the nodes' own adverts (every second by default) are on their way. A
# model heard of already but with no free route waits FLEET_WARMUP (another node may be unheard
# yet; no capacity is a 503 at once after that). A model not heard of at all waits up to
# UNKNOWN_WARMUP, three of a node's adverts (what it gets before it counts as gone: see
# `scheduler.fleet`): at 0.5 s, a scheduler restarted at load ~20 answered 404 model_not_found for
# a served model (chaos run 7), and a client takes a 404 as final.
FLEET_WARMUP = 0.5
UNKNOWN_WARMUP = 3.0
MAX_ADMITTING = 512  # admissions in progress at once per scheduler
BUFFER_SECONDS = 0.25  # work a work queue may hold beyond its running jobs, in seconds of its throughput
ANSWERS_KEPT = 20_000  # answered (job id, dispatch): a retried submission gets the same answer
ADMISSIONS_WAIT = 0.5  # seconds admissions in progress may take to answer once the scheduler stops
STOP_WAIT = 1.0  # seconds its loops may take to end after that


def work_stream(s: SchedulerSettings) -> StreamSpec:
    """The work queue's entry with the operator's limits."""
    return dataclasses.replace(
        streams.WORK, max_msgs=s.queue_max_jobs, max_bytes=s.queue_max_bytes, max_age=s.queue_max_age
    )


class Scheduler:
    """Build with `open` (it makes the streams and buckets), then `start` serving."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        settings: SchedulerSettings,
        *,
        quota: Quota,
        routing_kv: KeyValue,
        intake: IntakeLimits,
        nodes_kv: KeyValue,
        placements: Placements,
        metrics: SchedulerMetrics,
        tracing: Tracing,
    ) -> None:
        self._nc = nc
        self._js = js
        self._s = settings
        self.quota = quota
        self.placements = placements
        self._routing_kv = routing_kv
        self.fleet = Fleet(remember=settings.remember_models)
        self.nodes = NodeGate(nodes_kv, on_revoked=self.fleet.forget)  # enrolled nodes keep to their enrolment
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: list[Subscription] = []  # the request subscriptions, dropped first at stop
        self.routing = RoutingStore(routing.RoutingTable.load(settings.routing_file))
        self.health = Health(BreakerConfig(failures=settings.breaker_failures, cooldown=settings.breaker_cooldown))
        self._answered: OrderedDict[tuple[str, int], Admission] = OrderedDict()
        self._running: dict[tuple[str, int], asyncio.Future[Admission]] = {}
        self._admitting = asyncio.Semaphore(MAX_ADMITTING)
        self._admissions: set[asyncio.Task[None]] = set()
        self.metrics = metrics
        self._tracing = tracing
        self.releaser = Releaser(js, intake, buffer=self._buffer, on_release=metrics.released)
        self._serving_since = time.monotonic()  # when it began to serve (see FLEET_WARMUP); reset by `start`
        self._heard = asyncio.Event()  # set by every advert

    @classmethod
    async def open(
        cls, nc: NATS, js: JetStreamContext, settings: SchedulerSettings, *, metrics: SchedulerMetrics, tracing: Tracing
    ) -> Scheduler:
        replicas = replicas_setting(settings.replicas)
        intake = IntakeLimits(settings.intake_max_jobs, settings.intake_max_per_tenant, settings.intake_ack_wait)
        for spec in (work_stream(settings), streams.USAGE, intake.stream):
            await ensure(nc, spec, replicas=replicas)
        limits_kv = await open_bucket(nc, js, streams.LIMITS, replicas=replicas)
        routing_kv = await open_bucket(nc, js, streams.ROUTING, replicas=replicas)
        nodes_kv = await open_bucket(nc, js, streams.NODES, replicas=replicas)
        placements = Placements(
            await open_bucket(nc, js, streams.PLACEMENTS, replicas=replicas), nc, instance=uuid.uuid4().hex
        )
        quota_ = Quota(limits_kv, js)
        return cls(
            nc,
            js,
            settings,
            quota=quota_,
            routing_kv=routing_kv,
            intake=intake,
            nodes_kv=nodes_kv,
            placements=placements,
            metrics=metrics,
            tracing=tracing,
        )

    async def start(self) -> None:
        await self.routing.start(self._routing_kv)
        await self.nodes.start()
        await self.quota.start()  # follows the other schedulers' writes to the limit counters
        await self.placements.start()
        settler = Settler(self._js, self.quota, on_record=self._on_usage, clock=time.time)
        self._tasks.append(asyncio.create_task(settler.run()))
        await self._nc.subscribe(subjects.FLEET_HEARTBEAT_ALL, cb=self._on_advert)
        await self._nc.publish(subjects.FLEET_ROLL_CALL, b"")
        for subject, cb in (
            (subjects.SCHED_SUBMIT, self._on_submit),
            (subjects.SCHED_MODELS, self._on_models),
            (subjects.SCHED_PING, self._on_ping),
        ):
            self._serving.append(await self._nc.subscribe(subject, queue=subjects.SCHEDULER_QUEUE_GROUP, cb=cb))
        self._tasks.append(asyncio.create_task(self._prune_forever()))
        await self.releaser.start()
        self._serving_since = time.monotonic()  # a loaded start takes seconds itself: its warm-up counts from now
        log.info("scheduler.started")

    def _buffer(self, pool: str, model: str) -> int:
        """Jobs that may wait in a work queue: what its workers finish in BUFFER_SECONDS (the
        time a release takes to follow), so they never idle and little waits outside the
        fair order."""
        slots = sum(r.slots_total for r in self.fleet.routes(model, time.time()) if r.pool == pool)
        stats = self.health.stats.get((pool, model))
        seconds = stats.duration_s if stats and stats.duration_s > 0 else routing.DEFAULT_JOB_SECONDS
        return max(self._s.min_buffer, math.ceil(slots * BUFFER_SECONDS / seconds))

    async def stop(self) -> None:
        """Stop answering (the other schedulers of the queue group take over at once), give the
        admissions in progress a moment to answer, then stop every loop. Bounded, so a role that
        was told to stop exits within STOP_WAIT + 2 * ADMISSIONS_WAIT seconds whatever hangs."""
        for sub in self._serving:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if self._admissions:
            await asyncio.wait(set(self._admissions), timeout=ADMISSIONS_WAIT)
        for t in self._admissions:
            t.cancel()
        for t in self._tasks:
            t.cancel()
        parts = (self.releaser, self.nodes, self.quota, self.routing, self.placements)
        stopping = [asyncio.create_task(part.stop()) for part in parts]
        _, late = await asyncio.wait([*stopping, *self._tasks], timeout=STOP_WAIT)
        if late:
            log.warning("scheduler.stop_late", tasks=sorted(t.get_name() for t in late))

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.fleet.prune(time.time())

    async def _on_advert(self, msg: Msg) -> None:
        try:
            advert = self.nodes.admit(NodeAdvert.decode(msg.data))
        except WireError as e:
            log.warning("fleet.bad_advert", subject=msg.subject, error=str(e))
            return
        if advert is not None:
            self.fleet.observe(advert, time.time())
            self._heard.set()

    def _on_usage(self, record: UsageRecord) -> None:
        self.health.observe(record, time.time())

    async def _on_models(self, msg: Msg) -> None:
        await msg.respond(encode_model_list(self.fleet.models(time.time())))

    async def _on_ping(self, msg: Msg) -> None:
        await msg.respond(b"pong")

    async def _on_submit(self, msg: Msg) -> None:
        """Admissions run concurrently (each waits on KV and JetStream round trips); the
        subscription's own callback only starts them, up to MAX_ADMITTING at once."""
        await self._admitting.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._admissions.add(task)
        task.add_done_callback(self._admission_done)

    def _admission_done(self, task: asyncio.Task[None]) -> None:
        self._admissions.discard(task)
        self._admitting.release()

    async def _answer(self, msg: Msg) -> None:
        try:
            answer = await self._admit_once(msg.data)
        except TokenyardError as e:
            answer = Admission(error=e.to_wire())
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as e:
            # JetStream cannot take it now (a limits bucket or stream between leaders, after a NATS
            # node died): the client may try again shortly, it is no server error (it was a 500)
            log.warning("job.admit_unavailable", error=repr(e))
            unavailable = UnavailableError(
                "The scheduler's JetStream cannot take the request right now. Try again shortly.",
                retry_after=UNAVAILABLE_RETRY_AFTER,
            )
            answer = Admission(error=unavailable.to_wire())
        except Exception as e:  # top of a handler: answer, log, keep serving
            log.exception("job.admit_crashed")
            answer = Admission(error=TokenyardError(f"scheduler error: {type(e).__name__}").to_wire())
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(answer.encode())

    async def _admit_once(self, data: bytes) -> Admission:
        """One admission per (job id, dispatch) at a time here: a retry that arrives while the
        first is still running waits for its answer instead of placing the job again."""
        try:
            sub = Submission.decode(data)
        except WireError as e:
            raise InvalidRequestError(f"malformed submission: {e}") from e
        key = (sub.job.id, sub.job.dispatch)
        done = self._answered.get(key)
        if done is not None:  # a retry of an answered submission: the same answer, nothing reserved again
            return done
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            job = sub.job
            with (
                structlog.contextvars.bound_contextvars(request_id=job.request_id, job_id=job.id, model=job.model),
                self._tracing.span("scheduler.admit", job.traceparent, job_id=job.id, model=job.model) as hop,
            ):
                # the worker's span is this one's child: the job carries this hop's traceparent
                answer = await self._admit(
                    dataclasses.replace(sub, job=dataclasses.replace(job, traceparent=hop.traceparent))
                )
            future.set_result(answer)
            return answer
        except TokenyardError as e:
            self.metrics.refused(sub.job.model, e)
            future.set_exception(e)
            future.exception()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._running[key]

    async def _admit(self, sub: Submission) -> Admission:
        job = sub.job
        now = time.time()
        check_max_tokens(job.request, sub.key_limits, sub.org_limits)
        if job.dispatch > 1:  # the attempt before this one failed there: that node's health knows at once
            self.health.failed(sub.failed_pool, sub.failed_node, job.model, now)
        choice = await self._placement(sub)
        if choice.model != job.model:
            job = dataclasses.replace(job, model=choice.model, request={**job.request, "model": choice.model})
        payload = job.encode()
        if len(payload) > streams.MAX_JOB_BYTES:
            raise InvalidRequestError("The request is too large to queue.", code="request_too_large")
        # One placement per (job, dispatch), whichever scheduler is asked (scheduler.placements)
        placing = Placement(
            PLACING,
            now,
            by=uuid.uuid4().hex,
            pool=choice.route.pool,
            live_workers=choice.live_nodes,
            model=choice.model if choice.model != sub.job.model else "",
        )
        claim = await self.placements.claim(subjects.placement_key(job.id, job.dispatch), placing, started=sub.started)
        if isinstance(claim, Placement):  # placed already (a retried submission another scheduler answered)
            log.info("job.placed_already", dispatch=job.dispatch, pool=claim.pool)
            return claim.answer()
        try:
            return await self._place(sub, job, payload, choice, claim, now)
        except Exception:
            await self.placements.abandon(claim)
            raise

    async def _place(
        self, sub: Submission, job: Job, payload: bytes, choice: routing.Choice, claim: Claim, now: float
    ) -> Admission:
        """Reserve what the job may use, put it on its work queue (or hold it in the intake),
        record the placement: the admission of a job this scheduler claimed."""
        admitted = await self._reserve(sub, choice.route, now)
        reserved = admitted.entries
        if admitted.completion_tokens is not None:  # the budget's hard cap: the worker stops there
            capped = L.cap_completion(job.request, admitted.completion_tokens)
            if capped != job.request:
                job = dataclasses.replace(job, request=capped)
                payload = job.encode()
        pool = choice.route.pool
        direct = self.releaser.take_room(pool, job.model)
        seq = 0
        stored_already = False  # a claim taken over from a dead scheduler whose publish had landed
        try:
            if direct:
                subject = subjects.work_subject(pool, job.model)
                ack = await publish_job(self._js, subject, payload, msg_id=job.message_id)
                seq, stored_already = ack.seq, bool(ack.duplicate)
            else:
                await self.releaser.hold(Queued(job, pool, sub.tenant, sub.priority, now))
        except (nats.js.errors.APIError, QueueFullError, UnavailableError) as e:  # refused, or no leader in time
            if direct:
                self.releaser.give_back(pool, job.model)
            if reserved:
                await quota.release(self.quota, reserved, job.id, time.time())
            if is_full(e):
                raise QueueFullError(
                    "The queue for this model is full. Try again shortly.", retry_after=QUEUE_FULL_RETRY_AFTER
                ) from e
            if isinstance(e, nats.js.errors.APIError):  # refused otherwise: the client may try again, not a 500
                log.warning("job.enqueue_refused", job_id=job.id, error=str(e))
                raise UnavailableError(
                    "The job queue refused the job. Try again shortly.", retry_after=QUEUE_FULL_RETRY_AFTER
                ) from e
            raise
        self.placements.record(claim, seq=seq)
        self.health.placed(pool, job.model, (m.node for m in choice.route.members), now)
        self.metrics.admitted(job.model, pool, sub.priority, direct=direct, dispatch=job.dispatch)
        if stored_already:  # JetStream held it: placed once, by the scheduler that died
            log.info("job.enqueued_already", pool=pool, dispatch=job.dispatch, seq=seq)
        else:
            log.info("job.enqueued", pool=pool, dispatch=job.dispatch, held=not direct)
        lane = self._lane_credits(sub, choice) if direct and not reserved else 0
        answer = dataclasses.replace(
            claim.placement.answer(), lane_credits=lane, lane_ttl=self._s.lane_ttl if lane else 0.0
        )
        self._answered[(job.id, job.dispatch)] = answer
        while len(self._answered) > ANSWERS_KEPT:
            self._answered.popitem(last=False)
        return answer

    def _lane_credits(self, sub: Submission, choice: routing.Choice) -> int:
        """How many more jobs of this key and model the gateway may place itself: none unless
        they would be placed the same way with nothing to count, and no more than the pool's
        idle slots (its route's free slots less what is queued for it and this job). See "Lanes"."""
        job, route = sub.job, choice.route
        if not (
            self._s.lane_credits > 0
            and lane_eligible(sub)
            and choice.model == job.model
            and self.routing.table.policy_for(job.model, sub.key_id).strategy != "weighted"
            and self.health.closed(route.pool, route.model, (m.node for m in route.members))
        ):
            return 0
        return max(0, min(self._s.lane_credits, route.slots_free - route.queued - 1))

    async def _placement(self, sub: Submission) -> routing.Choice:
        """Where the job goes. Just after start, a model with no route yet may only be unheard
        (roll-call answers still on their way): wait for adverts until its warm-up is over
        (FLEET_WARMUP, or UNKNOWN_WARMUP for a model not heard of at all)."""
        while True:
            try:
                return self._route(sub, time.time())
            except (NoCapacityError, ModelNotFoundError) as e:
                warmup = UNKNOWN_WARMUP if isinstance(e, ModelNotFoundError) else FLEET_WARMUP
                left = self._serving_since + warmup - time.monotonic()
                if left <= 0:
                    raise
                self._heard.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._heard.wait(), left)

    def _route(self, sub: Submission, now: float) -> routing.Choice:
        request = sub.job.request
        prefs = routing.ProviderPrefs.from_request(request)
        return routing.choose(
            routing.candidate_models(sub.job.model, request),
            lambda m: self.routes(m, now, without=sub.left_node if sub.continuation else ""),
            self.fleet.known,
            lambda m: self.routing.table.policy_for(m, sub.key_id),
            prefs,
            avoid=sub.avoid,
            volunteer_ok=sub.volunteer_ok,
            draw=random.random(),
            continuation=sub.continuation,
        )

    def routes(self, model: str, now: float, *, without: str = "") -> list[routing.Route]:
        """The fleet's routes for `model` with what health and the queues add: a route counts
        only its nodes whose breakers let a job through (none: the route is not usable now), and
        never the node `without` (a continuation's: the node its answer was given up on)."""
        out = []
        for r in self.fleet.routes(model, now):
            stats = self.health.stats.get((r.pool, model))
            queued = self.releaser.queued(r.pool, model)
            usable = set(self.health.usable(r.pool, model, (m.node for m in r.members), now)) - {without}
            members = tuple(m for m in r.members if m.node in usable)
            if len(members) != len(r.members) and members:
                r = dataclasses.replace(
                    r,
                    nodes=len(members),
                    slots_total=sum(m.slots_total for m in members),
                    slots_free=sum(m.slots_free for m in members),
                )
            out.append(
                dataclasses.replace(
                    r,
                    breaker_ok=bool(members) or not r.members,  # no members: `healthy` is false already
                    members=members,
                    queued=queued,
                    ttft_ms=stats.ttft_ms if stats else 0.0,
                    tokens_per_s=stats.tokens_per_s if stats else 0.0,
                    duration_s=stats.duration_s if stats else 0.0,
                )
            )
        return out

    async def _reserve(self, sub: Submission, route: routing.Route, now: float) -> quota.Admitted:
        """Reserve the prompt and a completion grant on every limited subject (see
        `scheduler.limits`): bounded by the request, the route's context and the key's and org's
        max_tokens, and by what their budgets have left at this route's prices."""
        limited = quota.entries(sub.key_id, sub.tenant, sub.key_limits, sub.org_limits)
        if not limited:
            return quota.Admitted([], None)
        request = sub.job.request
        prompt = estimate_prompt_tokens(request.get("messages") or ())
        bound = L.completion_bound(
            requested_max_tokens(request),
            route.context_length,
            prompt,
            sub.key_limits.max_tokens,
            sub.org_limits.max_tokens,
        )
        ask = L.Ask(
            sub.job.id,
            prompt,
            sub.job.deadline + self._s.reservation_margin,
            completion_tokens=bound,
            input_price=route.input_price / 1e6,
            output_price=route.output_price / 1e6,
        )
        return await quota.admit(self.quota, limited, ask, now)
