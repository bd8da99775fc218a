"""Serving a request, whatever API it came through: open a session, start it (an idempotency
replay, a cache hit, or admission), relay the job's events, finish it (stop what still runs,
store the answer, write the usage record).

Thin on purpose: what to do when an attempt fails is `broker_api.attempts`, what is charged is
`broker_api.billing`, the states a session goes through are `broker_api.session`, and an API's
JSON is its shape module (`broker_api.chat_shape`). Nothing here touches HTTP.

A request whose client left mid-answer is billed from the stopped worker's own final count
(a DONE whose finish is `cancelled`): `finish` stops the attempt and a background task waits a
bounded moment for that count before recording usage, falling back to the gateway's estimate
when none comes (a dead worker).

Every job carries a ticket (`broker_api.tickets`): who asked, sealed so that only gateways can
read it. If this gateway dies mid-answer, the job's worker sends the ticket back with its counts
and another gateway bills the job from them (`broker_api.orphans`, `counted_by: "worker"`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable

import structlog

from broker_api import billing
from broker_api.accounting import Accounts
from broker_api.attempts import JobDriver, Policy
from broker_api.attribution import UNVERIFIED, Attribution
from broker_api.auth import Principal
from broker_api.bus import Bus
from broker_api.cache import ResponseCache, cache_key, cacheable
from broker_api.idempotency import Idempotency
from broker_api.jobrun import Broken, JobRun
from broker_api.lag import LoopLag
from broker_api.metrics import Metrics
from broker_api.output import ChoiceResult, Output, cached_results
from broker_api.session import Ask, Session
from broker_api.settings import ApiSettings
from broker_api.tickets import Tickets
from schemas.answers import CachedAnswer
from schemas.errors import TokenyardError
from schemas.events import Claim, Delta, Done, Failed, Start
from schemas.jobs import Job, Submission
from schemas.usage import Ticket

log = structlog.get_logger(__name__)

# How long a cancelled request's usage record waits for the stopped worker's own count. A live
# worker answers a stop within milliseconds; a dead one never does, and then the gateway's
# estimate stands. It delays only the record (in the background), never a response.
CANCEL_REPORT_WAIT = 1.5
# `finish`'s reason for a stream whose client stopped reading (`broker_api.web.BoundedStream`):
# its job is stopped and it is billed for what was written, never for what the worker produced
# after the client stopped taking it.
STALLED = "client stopped reading"


class Serving:
    def __init__(
        self,
        bus: Bus,
        settings: ApiSettings,
        *,
        accounts: Accounts,
        idempotency: Idempotency,
        metrics: Metrics,
        cache: ResponseCache | None,  # None: the gateway runs without a response cache
        tickets: Tickets,
        lag: LoopLag,
        attribute: Callable[[Claim, str], Attribution] = lambda claim, pool: Attribution(claim.node, None),
    ) -> None:
        self._attribute = attribute  # (claim, pool) -> the node a record names and its price (`attribution`)
        self._bus = bus
        self._s = settings
        self._accounts = accounts
        self._idempotency = idempotency
        self._metrics = metrics
        self._cache = cache
        self._tickets = tickets
        self._lag = lag  # how far behind this gateway's loop ran (the jobs' silence leaves it out)
        self._settling: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones

    def open(
        self,
        ask: Ask,
        who: Principal,
        *,
        use_cache: bool = True,
        idempotency_key: str = "",
        request_id: str = "",
        traceparent: str = "",
    ) -> Session:
        job_id = uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(job_id=job_id, model=ask.model)
        arrived = time.time()
        estimated = max(1, ask.prompt_estimate + (ask.token_limit or 0))
        limited = not (who.key_limits.empty and who.org_limits.empty)
        # who asked, sealed for any gateway to bill the job from its worker's report if this one dies
        ticket = Ticket(
            org=who.org,
            project=who.project,
            key_id=who.key_id,
            model=ask.model,
            arrived=arrived,
            stream=ask.stream,
            reserved_tokens=estimated if limited else 0,  # as `billing.reserved_tokens`
            prompt_estimate=ask.prompt_estimate,
            max_completion=(ask.token_limit or 0) * ask.choices,
        )
        job = Job(
            id=job_id,
            model=ask.model,
            request=ask.body,
            streamed=ask.stream,
            reply=self._bus.reply_subject(job_id),
            deadline=arrived + self._s.request_timeout,
            request_id=request_id,
            traceparent=traceparent,
            ticket=self._tickets.seal(job_id, ticket),
        )
        sub = Submission(
            job=job,
            tenant=who.org,
            key_id=who.key_id,
            priority=who.priority,
            key_limits=who.key_limits,
            org_limits=who.org_limits,
            estimated_tokens=estimated,
            volunteer_ok=who.volunteer_ok,
        )
        claim = self._idempotency.key_for(who.org, idempotency_key) if idempotency_key else ""
        key = cache_key(ask.body) if self._cache is not None and use_cache and who.cache and cacheable(ask.body) else ""
        session = Session(
            ask=ask,
            who=who,
            job=job,
            sub=sub,
            run=JobRun(job, silence=self._s.attempt_silence),
            output=Output(ask.choices),
            cache_key=key,
            idempotency_key=claim,
            arrived=arrived,
        )
        self._metrics.opened(ask.model)
        return session

    async def start(self, s: Session) -> None:
        """Replay an earlier answer, answer from the cache, or admit the job; raises if it is not admitted."""
        if s.idempotency_key:
            replay = await self._idempotency.claim_or_wait(
                s.idempotency_key, s.job.id, s.job.deadline, digest=self._idempotency.body_digest(s.job.request)
            )
            if replay is not None:
                s.answered(replay, replay=True)
                return
        try:
            await self._admit(s)
        except BaseException:
            if s.idempotency_key:
                await self._idempotency.release(s.idempotency_key)
            raise

    async def _admit(self, s: Session) -> None:
        if s.cache_key and self._cache is not None:
            hit = await self._cache.get(s.cache_key)
            if hit is not None:
                s.answered(hit, replay=False)
                return
        self._bus.open_run(s.run)
        try:
            admission = await self._bus.submit(
                s.sub, timeout=self._s.submit_timeout, deadline=s.job.deadline, run=s.run
            )
        except BaseException:
            await self._bus.close_run(s.run, "not admitted")
            raise
        s.run.placed(s.job.dispatch, admission.pool, admission.model)
        s.to("admitted")

    # --- the answer -----------------------------------------------------------------------

    async def events(self, s: Session) -> AsyncGenerator[Delta | Done, None]:
        """The winning attempt's DELTA and DONE events, in order (added to `s.output`);
        raises if the job fails."""
        driver = JobDriver(
            self._bus,
            s.run,
            s.sub,
            s.output,
            policy=Policy(
                max_dispatches=self._s.max_dispatches,
                continues=s.ask.continuation is not None and self._s.continues(s.ask.model),
            ),
            continuation=s.ask.continuation,
            submit_timeout=self._s.submit_timeout,
            lag=self._lag,
            on_continue=lambda: self._metrics.continued(s.ask.model),
            proven=self._proven_node,
            idle=self._s.stream_idle_timeout,
        )
        events = driver.events()
        try:
            async for ev in events:
                s.relayed(time.monotonic())
                if isinstance(ev, Done):
                    s.finished(ev)
                yield ev
        except TokenyardError as e:
            s.failed(e.status)
            raise
        finally:
            await events.aclose()

    async def results(self, s: Session) -> list[ChoiceResult]:
        """Every choice, finished: run to the end, or as stored."""
        if s.cached is not None:
            return cached_results(s.cached, s.ask.choices)
        async for _ in self.events(s):
            pass
        if s.done is None:  # events() ends only at a DONE or by raising
            raise TokenyardError("The job ended without an answer.")
        return s.output.results(s.done)

    def attribution(self, s: Session) -> Attribution:
        """Which node ran the answer, as its proof shows (`broker_api.attribution`)."""
        # the attempt whose output the answer holds; with no output, the last one heard from
        claim = s.run.claim_of(s.output.attempt) if s.output.attempt >= 0 else s.run.claim
        if s.cached is not None or not claim.node:
            return Attribution("", None)
        return self._attribute(claim, s.run.route_of(claim.attempt))

    def _proven_node(self, claim: Claim, pool: str) -> str:
        """The node an attempt's claim proves, "" if none: what its failure is counted against."""
        node = self._attribute(claim, pool).node
        return "" if node == UNVERIFIED else node

    def charge(self, s: Session, attribution: Attribution | None = None) -> billing.Charge:
        price = (attribution or self.attribution(s)).price
        return billing.charge(
            s.output,
            s.done,
            s.cached,
            prompt_estimate=s.ask.prompt_estimate,
            cache_hit_cost=self._s.cache_hit_cost,
            price=price,
        )

    # --- the end --------------------------------------------------------------------------

    async def finish(self, s: Session, reason: str) -> None:
        """Called once the response ended (more calls do nothing): stops the attempt if needed,
        stores the answer, records usage (for a client that left mid-answer, a moment later:
        see `_settle`)."""
        if s.state in ("cancelled", "recorded"):
            return
        s.ended = time.monotonic()
        match s.state:
            case "opened" | "replayed":  # never admitted, or an earlier request's answer: nothing to bill
                s.to("recorded")
            case "cached":
                await self._complete_claim(s, s.cached)
                self._record(s)
            case "done":
                await self._bus.close_run(s.run, reason)
                model, route = billing.served_by(s)
                answer = (
                    billing.stored_answer(s.output, s.done, self.charge(s), model=model, route=route)
                    if s.done is not None
                    else None
                )
                await self._complete_claim(s, answer)
                if answer is not None and s.cache_key and self._cache is not None:
                    await self._cache.put(s.cache_key, answer)
                self._record(s)
            case "failed":
                await self._bus.close_run(s.run, reason)
                await self._complete_claim(s, None)
                self._record(s)
            case "admitted" | "running":  # the client left while an attempt ran
                s.to("cancelled")
                cut = s.run.current
                if cut is None or reason == STALLED:
                    if cut is not None and not s.run.finished:
                        await self._bus.stop(s.run.current_node, s.job.id, cut, reason)
                    await self._bus.close_run(s.run, reason)
                    await self._complete_claim(s, None)
                    self._record(s)
                    return
                # stop it, but keep its run open for its final count
                if not s.run.finished:
                    await self._bus.stop(s.run.current_node, s.job.id, cut, reason)
                await self._complete_claim(s, None)
                task = asyncio.create_task(self._settle(s, cut, reason))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)

    async def _complete_claim(self, s: Session, answer: CachedAnswer | None) -> None:
        """Store the answer under the request's Idempotency-Key, or free the key for a retry."""
        if not s.idempotency_key:
            return
        if answer is not None:
            digest = self._idempotency.body_digest(s.job.request)
            await self._idempotency.complete(s.idempotency_key, answer, digest=digest)
            return
        await self._idempotency.release(s.idempotency_key)

    async def drain(self) -> None:
        """Let cancelled requests that still wait for their worker's count record it (at shutdown,
        before the usage publisher is flushed)."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=CANCEL_REPORT_WAIT + 1.0)

    async def _settle(self, s: Session, attempt: int, reason: str) -> None:
        """Record a cancelled request from its stopped attempt's final count, if it comes."""
        try:
            s.done = await self._final_count(s, attempt)
        finally:
            await self._bus.close_run(s.run, reason)
            self._record(s)

    async def _final_count(self, s: Session, attempt: int) -> Done | None:
        """Tally the stopped attempt's last events (sent before it heard the stop) up to its DONE,
        whose counts and cost are the worker's; None if none comes within CANCEL_REPORT_WAIT or
        the attempt failed or lost events: the gateway's own estimate stands."""
        try:
            async with asyncio.timeout(CANCEL_REPORT_WAIT):
                while True:
                    item = await s.run.queue.get()
                    if isinstance(item, (Broken, Failed)):
                        return None
                    if item.attempt != attempt or isinstance(item, Start):
                        continue
                    s.output.add(item)
                    if isinstance(item, Done):
                        return item
        except TimeoutError:
            log.info("job.cancel_unreported", job_id=s.job.id, attempt=attempt)
            return None

    def _record(self, s: Session) -> None:
        attribution = self.attribution(s)
        record = billing.usage_record(s, self.charge(s, attribution), node=attribution.node, now=time.monotonic())
        s.to("recorded")
        self._metrics.finished(
            model=record.model,
            outcome=record.outcome,
            status=record.status,
            prompt=record.prompt_tokens,
            completion=record.completion_tokens,
            seconds=record.duration_ms / 1e3,
            ttft=record.ttft_ms / 1e3 if record.ttft_ms else None,
            route=record.route,
            attempts=record.attempts,
        )
        self._accounts.usage(record, stored=s.run.recorded)  # then the worker need not report the job
