"""Serving `/v1/chat/completions`: a validated request becomes a job; the job's events become
one OpenAI response or an SSE stream; its end becomes one usage record.

`ChatService.events` drives one job to its end: it waits for the winning attempt's events,
re-dispatches when an attempt fails or dies before anything reached the client, and raises a
`TokenyardError` when the job cannot finish. Nothing here touches HTTP; `broker_api.app`
turns the results into responses.

A request whose client left mid-answer is billed from the stopped worker's own final count
(a DONE whose finish is `cancelled`): `finish` stops the attempt and a background task waits a
bounded moment for that count before recording usage, falling back to the gateway's estimate
when none comes (a dead worker).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from broker_api.accounting import Accounts
from broker_api.auth import Principal
from broker_api.bus import Bus
from broker_api.cache import CachedAnswer, ResponseCache, cache_key, cacheable
from broker_api.idempotency import Idempotency
from broker_api.jobrun import Broken, JobRun, Streamed
from broker_api.metrics import Metrics
from broker_api.settings import ApiSettings
from schemas.chat import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChunkEncoder,
    ResponseMessage,
    Usage,
)
from schemas.errors import DeadlineExceededError, TokenyardError, WorkerFailedError, from_wire
from schemas.events import Delta, Done, Failed, Start
from schemas.jobs import ATTEMPTS_PER_DISPATCH, Job, Submission
from schemas.registry import Price
from schemas.rules import estimate_prompt_tokens
from schemas.usage import Outcome, UsageRecord

log = structlog.get_logger(__name__)

TICK = 0.25  # seconds between liveness checks while a job is quiet
# How long a cancelled request's usage record waits for the stopped worker's own count. A live
# worker answers a stop within milliseconds; a dead one never does, and then the gateway's
# estimate stands. It delays only the record (in the background), never a response.
CANCEL_REPORT_WAIT = 1.5


@dataclass(slots=True)
class Tally:
    """What the gateway itself relayed from the winning attempt (and, after a continuation,
    from the attempts that carried the answer on): the basis of usage."""

    attempt: int = -1
    texts: list[list[str]] = field(default_factory=list)
    tokens: int = 0
    chars: int = 0
    carried: int = 0  # tokens relayed before the current attempt continued the answer
    continuing: bool = False

    def reset(self, attempt: int, n: int) -> None:
        self.attempt, self.texts, self.tokens, self.chars = attempt, [[] for _ in range(n)], 0, 0

    def carry_on(self) -> None:
        """The next attempt continues this text rather than replacing it."""
        self.continuing, self.carried = True, self.tokens

    def add(self, ev: Delta | Done, n: int) -> None:
        if ev.attempt != self.attempt:
            if self.continuing:
                self.attempt, self.continuing = ev.attempt, False
            else:
                self.reset(ev.attempt, n)
        for piece in ev.pieces:
            self.texts[piece.index].append(piece.text)
            self.tokens += piece.tokens
            self.chars += len(piece.text)

    def completion_tokens(self, done: Done) -> int:
        """As reported when the relayed text can hold that many, else as counted here."""
        reported = done.completion_tokens + self.carried
        if not 0 <= reported <= max(self.tokens, self.chars):
            log.warning("job.usage_mismatch", job_id=done.job_id, reported=reported, relayed=self.tokens)
            return self.tokens
        return reported


@dataclass(slots=True)
class Session:
    """One request from arrival to its usage record."""

    req: ChatCompletionRequest
    who: Principal
    job: Job
    started: float = field(default_factory=time.monotonic)
    arrived: float = field(default_factory=time.time)
    ended: float = 0.0  # monotonic time the response ended (the record may be written later)
    run: JobRun | None = None
    sub: Submission | None = None
    tally: Tally = field(default_factory=Tally)
    done: Done | None = None
    first_token: float = 0.0
    status: int = 200
    outcome: Outcome = "cancelled"
    cache_key: str = ""
    cached: CachedAnswer | None = None
    idempotency_key: str = ""
    replayed: bool = False  # answered from an earlier request with the same Idempotency-Key
    recorded: bool = False

    @property
    def n(self) -> int:
        return self.req.n or 1

    def usage(self) -> Usage:
        if self.cached is not None:
            return Usage.of(self.cached.prompt_tokens, self.cached.completion_tokens)
        if self.done is not None:
            # a continuation's prompt held the carried text too: that part was billed as completion
            return Usage.of(
                max(0, self.done.prompt_tokens - self.tally.carried), self.tally.completion_tokens(self.done)
            )
        return Usage.of(
            estimate_prompt_tokens(self.req.model_dump()["messages"]) if self.tally.tokens else 0, self.tally.tokens
        )


class ChatService:
    def __init__(
        self,
        bus: Bus,
        settings: ApiSettings,
        *,
        accounts: Accounts | None = None,
        cache: ResponseCache | None = None,
        idempotency: Idempotency | None = None,
        price_of: Callable[[str, str], Price | None] = lambda node, pool: None,
    ) -> None:
        self._bus = bus
        self._price_of = price_of  # (node, pool) -> the registry's price for an enrolled node's work
        self._s = settings
        self._accounts = accounts
        self._cache = cache
        self._idempotency = idempotency
        self._settling: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones
        self.metrics: Metrics | None = None

    def open(
        self,
        req: ChatCompletionRequest,
        who: Principal,
        *,
        use_cache: bool = True,
        idempotency_key: str = "",
        request_id: str = "",
        traceparent: str = "",
    ) -> Session:
        job_id = uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(job_id=job_id, model=req.model)
        if self.metrics is not None:
            self.metrics.opened(req.model)
        body = req.model_dump(exclude_none=True, exclude={"stream", "stream_options"})
        job = Job(
            id=job_id,
            model=req.model,
            request=body,
            reply=self._bus.reply_subject(job_id),
            deadline=time.time() + self._s.request_timeout,
            request_id=request_id,
            traceparent=traceparent,
        )
        session = Session(req=req, who=who, job=job)
        if self._cache is not None and use_cache and who.cache and cacheable(body):
            session.cache_key = cache_key(body)
        if idempotency_key and self._idempotency is not None:
            session.idempotency_key = self._idempotency.key_for(who.org, idempotency_key)
        return session

    async def start(self, s: Session) -> None:
        """Replay an earlier answer, answer from the cache, or admit the job; raises if it is not admitted."""
        if s.idempotency_key and self._idempotency is not None:
            s.cached = await self._idempotency.claim_or_wait(
                s.idempotency_key, s.job.id, s.job.deadline, digest=self._idempotency.body_digest(s.job.request)
            )
            if s.cached is not None:
                s.replayed, s.outcome = True, "cached"
                return
        try:
            await self._admit(s)
        except BaseException:
            if s.idempotency_key and self._idempotency is not None:
                await self._idempotency.release(s.idempotency_key)
            raise

    async def _admit(self, s: Session) -> None:
        if s.cache_key and self._cache is not None:
            s.cached = await self._cache.get(s.cache_key)
            if s.cached is not None:
                s.outcome = "cached"
                return
        s.run = self._bus.open_run(s.job, silence=self._s.attempt_silence)
        est = max(1, estimate_prompt_tokens(s.job.request["messages"]) + (s.req.token_limit or 0))
        s.sub = Submission(
            job=s.job,
            tenant=s.who.org,
            key_id=s.who.key_id,
            priority=s.who.priority,
            key_limits=s.who.key_limits,
            org_limits=s.who.org_limits,
            estimated_tokens=est,
            volunteer_ok=s.who.volunteer_ok,
        )
        try:
            admission = await self._bus.submit(s.sub, timeout=self._s.submit_timeout, deadline=s.job.deadline)
        except BaseException:
            await self._bus.close_run(s.run, "not admitted")
            s.run = None
            raise
        s.run.pool_of_dispatch[s.job.dispatch] = admission.pool

    async def finish(self, s: Session, reason: str) -> None:
        """Always called once the response ended: stops the attempt if needed, records usage
        (for a client that left mid-answer, a moment later: see `_settle`)."""
        run = s.run
        if s.recorded or s.replayed or (run is None and s.cached is None):
            if run is not None:
                await self._bus.close_run(run, reason)
            return  # a replay, or never admitted: nothing ran, nothing to bill
        s.recorded, s.ended = True, time.monotonic()
        # The client left while an attempt ran: stop it, but keep its run open for its final count.
        cut = None
        if run is not None and s.done is None and s.outcome == "cancelled" and run.current is not None:
            cut = run.current
            if not run.finished:
                await self._bus.stop(run.current_node, run.job.id, cut, reason)
        elif run is not None:
            await self._bus.close_run(run, reason)
        answer = None
        if s.done is not None and s.outcome == "ok":
            u = s.usage()
            answer = CachedAnswer(
                ["".join(t) for t in s.tally.texts],
                list(s.done.finish),
                u.prompt_tokens,
                u.completion_tokens,
                s.done.cost or 0.0,
            )
        elif s.cached is not None:
            answer = s.cached
        if s.idempotency_key and self._idempotency is not None:
            if answer is not None:
                await self._idempotency.complete(
                    s.idempotency_key, answer, digest=self._idempotency.body_digest(s.job.request)
                )
            else:
                await self._idempotency.release(s.idempotency_key)
        if answer is not None and s.cached is None and s.cache_key and self._cache is not None:
            await self._cache.put(s.cache_key, answer)
        if cut is not None:
            task = asyncio.create_task(self._settle(s, cut, reason))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        else:
            self._account(s)

    async def drain(self) -> None:
        """Let cancelled requests that still wait for their worker's count record it (at shutdown,
        before the usage publisher is flushed)."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=CANCEL_REPORT_WAIT + 1.0)

    async def _settle(self, s: Session, attempt: int, reason: str) -> None:
        """Record a cancelled request from its stopped attempt's final count, if it comes."""
        run = s.run
        assert run is not None
        try:
            s.done = await self._final_count(s, run, attempt)
        finally:
            await self._bus.close_run(run, reason)
            self._account(s)

    async def _final_count(self, s: Session, run: JobRun, attempt: int) -> Done | None:
        """Tally the stopped attempt's last events (sent before it heard the stop) up to its DONE,
        whose counts and cost are the worker's; None if none comes within CANCEL_REPORT_WAIT or
        the attempt failed or lost events: the gateway's own estimate stands."""
        try:
            async with asyncio.timeout(CANCEL_REPORT_WAIT):
                while True:
                    item = await run.queue.get()
                    if isinstance(item, (Broken, Failed)):
                        return None
                    if item.attempt != attempt or isinstance(item, Start):
                        continue
                    s.tally.add(item, s.n)
                    if isinstance(item, Done):
                        return item
        except TimeoutError:
            log.info("job.cancel_unreported", job_id=s.job.id, attempt=attempt)
            return None

    def _account(self, s: Session) -> None:
        record = self._record(s)
        if self.metrics is not None:
            self.metrics.finished(
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
        if self._accounts is not None:
            self._accounts.usage(record)

    def _record(self, s: Session) -> UsageRecord:
        u = s.usage()
        route, node, attempts = "", "", s.job.dispatch
        if s.cached is not None:
            route = "cache"
        elif s.run is not None:
            attempt = s.tally.attempt if s.tally.attempt >= 0 else (s.run.current or 0)
            route = s.run.pool_of_dispatch.get(attempt // ATTEMPTS_PER_DISPATCH, "")
            node = s.run.current_node
            attempts = s.run.job.dispatch
        now = s.ended or time.monotonic()
        return UsageRecord(
            job_id=s.job.id,
            time=s.arrived,
            org=s.who.org,
            project=s.who.project,
            key_id=s.who.key_id,
            model=s.req.model,
            route=route,
            node=node,
            attempts=attempts,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cached_tokens=u.prompt_tokens if s.cached else 0,
            cost=self._cost(s),
            ttft_ms=round((s.first_token - s.started) * 1e3, 3) if s.first_token else 0.0,
            duration_ms=round((now - s.started) * 1e3, 3),
            outcome=s.outcome,
            status=s.status,
            stream=bool(s.req.stream),
            reserved_tokens=self._reserved(s),
        )

    @staticmethod
    def _reserved(s: Session) -> int:
        """What admission reserved: only limited keys reserve, and only those need settling."""
        if s.sub is None or (s.sub.key_limits.empty and s.sub.org_limits.empty):
            return 0
        return max(1, s.sub.estimated_tokens)

    # --- driving a job ------------------------------------------------------------------

    async def events(self, s: Session) -> AsyncGenerator[Delta | Done, None]:
        """The winning attempt's DELTA and DONE events, in order; raises if the job fails."""
        run = s.run
        assert run is not None and s.sub is not None
        try:
            while True:
                item = await self._next(run)
                if item is None:
                    if run.silent(time.monotonic()):
                        gone = run.drop_current()
                        if gone:
                            await self._bus.stop(gone[1], run.job.id, gone[0], "silent")
                        await self._again(s, "the worker stopped responding", avoid=False)
                    continue
                if isinstance(item, Broken):
                    await self._bus.stop(item.node, run.job.id, item.attempt, "lost events")
                    await self._again(s, f"the worker's events were lost ({item.reason})", avoid=False)
                    continue
                if isinstance(item, Start):
                    continue
                if isinstance(item, Failed):
                    run.drop_current()
                    error = from_wire(item.error or {})
                    if not item.retryable:
                        raise error
                    await self._again(s, error.message, avoid=True)
                    continue
                s.tally.add(item, s.n)
                if not s.first_token:
                    s.first_token = time.monotonic()
                if isinstance(item, Done):
                    s.done, s.outcome = item, "ok"
                yield item
                if isinstance(item, Done):
                    return
        except TokenyardError as e:
            s.status, s.outcome = e.status, "error"
            raise

    async def _next(self, run: JobRun) -> Streamed | Broken | None:
        if not run.queue.empty():
            return run.queue.get_nowait()
        remaining = run.job.deadline - time.time()
        if remaining <= 0:
            if run.current is None and not run.committed:
                raise DeadlineExceededError("No worker answered the request before its deadline.")
            raise DeadlineExceededError("The request did not finish before its deadline.")
        try:
            async with asyncio.timeout(min(remaining, TICK)):
                return await run.queue.get()
        except TimeoutError:
            return None

    async def _again(self, s: Session, why: str, *, avoid: bool) -> None:
        """Place the job once more, unless the budget is spent. Before anything reached the
        client it simply runs again; after, it continues from the text already delivered where
        the model allows that, and otherwise the answer ends with an error."""
        run, sub = s.run, s.sub
        assert run is not None and sub is not None
        job = run.job
        if job.dispatch >= self._s.max_dispatches:
            raise WorkerFailedError(
                f"The request failed on every attempt ({job.dispatch}); last: {why}."
                if not run.committed
                else f"The answer was interrupted: {why}."
            )
        failed_pool = run.pool_of_dispatch.get(job.dispatch, "")
        again = dataclasses.replace(job, dispatch=job.dispatch + 1)
        if run.committed:
            again = self._continuation(s, again, why)
        s.sub = dataclasses.replace(sub, job=again, avoid=sub.avoid + ((failed_pool,) if avoid and failed_pool else ()))
        run.job = again
        log.info("job.redispatch", job_id=job.id, dispatch=again.dispatch, why=why)
        admission = await self._bus.submit(s.sub, timeout=self._s.submit_timeout, deadline=job.deadline)
        run.pool_of_dispatch[again.dispatch] = admission.pool

    def _continuation(self, s: Session, job: Job, why: str) -> Job:
        """The job again, asked to continue the text the client already has (one choice only)."""
        if not self._s.continues(s.req.model) or s.n != 1:
            raise WorkerFailedError(f"The answer was interrupted: {why}.")
        assert s.run is not None
        request = dict(job.request)
        request["messages"] = [*request["messages"], {"role": "assistant", "content": "".join(s.tally.texts[0])}]
        limit = s.req.token_limit
        if limit is not None:
            request.pop("max_tokens", None)
            request["max_completion_tokens"] = max(1, limit - s.tally.tokens)
        s.tally.carry_on()
        if self.metrics is not None:
            self.metrics.continued(s.req.model)
        s.run.min_attempt = job.attempt_id(0)
        log.info("job.continue", job_id=job.id, dispatch=job.dispatch, carried_tokens=s.tally.tokens, why=why)
        return dataclasses.replace(job, request=request)

    # --- shaping the answer -------------------------------------------------------------

    def _cost(self, s: Session) -> float:
        """USD: the route's price for what ran; a cache hit at the configured fraction."""
        if s.cached is not None:
            return round(s.cached.cost * self._s.cache_hit_cost, 10)
        if s.run is not None and s.run.current_node:
            attempt = s.tally.attempt if s.tally.attempt >= 0 else (s.run.current or 0)
            price = self._price_of(s.run.current_node, s.run.pool_of_dispatch.get(attempt // ATTEMPTS_PER_DISPATCH, ""))
            if price is not None:  # an enrolled node: its owner's price, never the node's own claim
                u = s.usage()
                return round(price.cost(u.prompt_tokens, u.completion_tokens), 10)
        return round((s.done.cost or 0.0) if s.done is not None else 0.0, 10)

    def _usage(self, s: Session) -> Usage:
        u = s.usage()
        return u.model_copy(update={"cost": self._cost(s)}) if s.req.wants_cost else u

    async def complete(self, s: Session) -> ChatCompletion:
        if s.cached is None:
            async for _ in self.events(s):
                pass
            assert s.done is not None
            texts = ["".join(t) for t in s.tally.texts]
            finish: list[str] = list(s.done.finish)
        else:
            texts, finish = s.cached.texts, s.cached.finish
        choices = [
            Choice(
                index=i,
                message=ResponseMessage(content=texts[i] if i < len(texts) else "", refusal=None),
                logprobs=None,
                finish_reason=finish[i] if i < len(finish) else "stop",  # type: ignore[arg-type]
            )
            for i in range(s.n)
        ]
        return ChatCompletion(
            id=f"chatcmpl-{s.job.id}", created=int(s.arrived), model=s.req.model, choices=choices, usage=self._usage(s)
        )

    async def stream(self, s: Session) -> AsyncIterator[str]:
        """SSE `data:` payloads. The first is produced before the HTTP response starts, so any
        error up to then is still an HTTP error; after it, errors become an error event."""
        enc = ChunkEncoder(
            id=f"chatcmpl-{s.job.id}", created=int(s.arrived), model=s.req.model, include_usage=s.req.wants_usage_chunk
        )
        if s.cached is not None:
            for i in range(s.n):
                if i < len(s.cached.texts) and s.cached.texts[i]:
                    yield enc.content(i, s.cached.texts[i])
            finish = s.cached.finish
        else:
            events = self.events(s)
            try:
                async for ev in events:
                    assert s.run is not None
                    s.run.committed = True
                    for piece in ev.pieces:
                        if piece.text:
                            yield enc.content(piece.index, piece.text)
            except TokenyardError as e:
                if s.run is None or not s.run.committed:
                    raise
                log.warning("job.stream_failed", job_id=s.job.id, error=e.message)
                yield json.dumps(e.body(), separators=(",", ":"))
                return
            finally:
                await events.aclose()
            assert s.done is not None
            finish = list(s.done.finish)
        for i in range(s.n):
            yield enc.finish(i, finish[i] if i < len(finish) else "stop")
        if s.req.wants_usage_chunk:
            yield enc.usage(self._usage(s))
        yield "[DONE]"
