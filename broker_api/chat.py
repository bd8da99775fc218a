"""Serving `/v1/chat/completions`: a validated request becomes a job; the job's events become
one OpenAI response or an SSE stream.

`ChatService.run` drives one job to its end: it waits for the winning attempt's events,
re-dispatches when an attempt fails or dies before anything reached the client, and raises a
`TokenyardError` when the job cannot finish. Nothing here touches HTTP; `broker_api.app`
turns the results into responses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from broker_api.auth import Principal
from broker_api.bus import Bus
from broker_api.jobrun import Broken, JobRun
from broker_api.settings import ApiSettings
from schemas.chat import (ChatCompletion, ChatCompletionRequest, Choice, ChunkEncoder, ResponseMessage, Usage)
from schemas.errors import DeadlineExceededError, TokenyardError, WorkerFailedError, from_wire
from schemas.jobs import DONE, ERROR, START, Event, Job, Submission

log = structlog.get_logger(__name__)

TICK = 0.25  # seconds between liveness checks while a job is quiet


@dataclass(slots=True)
class Tally:
    """What the gateway itself relayed from the winning attempt: the basis of usage."""

    attempt: int = -1
    texts: list[list[str]] = field(default_factory=list)
    tokens: int = 0
    chars: int = 0

    def reset(self, attempt: int, n: int) -> None:
        self.attempt, self.texts, self.tokens, self.chars = attempt, [[] for _ in range(n)], 0, 0

    def add(self, ev: Event, n: int) -> None:
        if ev.attempt != self.attempt:
            self.reset(ev.attempt, n)
        for index, text, tokens in ev.pieces:
            self.texts[index].append(text)
            self.tokens += tokens
            self.chars += len(text)

    def usage(self, done: Event) -> Usage:
        """Prompt tokens as the worker counted them; completion tokens as reported when the
        relayed text can hold that many, else what the gateway counted itself."""
        completion = done.completion_tokens
        if not 0 <= completion <= max(self.tokens, self.chars):
            log.warning("job.usage_mismatch", job_id=done.job_id, reported=completion, relayed=self.tokens)
            completion = self.tokens
        return Usage.of(max(0, done.prompt_tokens), completion)


class ChatService:
    def __init__(self, bus: Bus, settings: ApiSettings) -> None:
        self._bus = bus
        self._s = settings

    def new_job(self, req: ChatCompletionRequest) -> Job:
        job_id = uuid.uuid4().hex
        body = req.model_dump(exclude_none=True, exclude={"stream", "stream_options"})
        return Job(id=job_id, model=req.model, request=body, reply=self._bus.reply_subject(job_id),
                   deadline=time.time() + self._s.request_timeout)

    async def start(self, job: Job, who: Principal) -> tuple[JobRun, Submission]:
        run = self._bus.open_run(job, silence=self._s.attempt_silence)
        sub = Submission(job=job, tenant=who.tenant, key_id=who.key_id)
        try:
            admission = await self._bus.submit(sub, timeout=self._s.submit_timeout, deadline=job.deadline)
        except BaseException:
            await self._bus.close_run(run, "not admitted")
            raise
        run.pool_of_dispatch[job.dispatch] = admission.pool
        return run, sub

    async def finish(self, run: JobRun, reason: str) -> None:
        await self._bus.close_run(run, reason)

    async def events(self, run: JobRun, sub: Submission) -> AsyncIterator[Event]:
        """The winning attempt's DELTA and DONE events, in order; raises if the job fails."""
        while True:
            item = await self._next(run)
            if item is None:
                if run.silent(time.monotonic()):
                    gone = run.drop_current()
                    if gone:
                        await self._bus.stop(gone[1], run.job.id, gone[0], "silent")
                    sub = await self._again(run, sub, "the worker stopped responding", avoid=False)
                continue
            if isinstance(item, Broken):
                await self._bus.stop(item.node, run.job.id, item.attempt, "lost events")
                sub = await self._again(run, sub, f"the worker's events were lost ({item.reason})", avoid=False)
                continue
            if item.kind == START:
                continue
            if item.kind == ERROR:
                run.drop_current()
                error = from_wire(item.error or {})
                if not item.retryable:
                    raise error
                sub = await self._again(run, sub, error.message, avoid=True)
                continue
            yield item
            if item.kind == DONE:
                return

    async def _next(self, run: JobRun) -> Event | Broken | None:
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

    async def _again(self, run: JobRun, sub: Submission, why: str, *, avoid: bool) -> Submission:
        """Place the job once more, unless content already reached the client or the budget is spent."""
        job = run.job
        if run.committed:
            raise WorkerFailedError(f"The answer was interrupted: {why}.")
        if job.dispatch >= self._s.max_dispatches:
            raise WorkerFailedError(f"The request failed on every attempt ({job.dispatch}); last: {why}.")
        failed_pool = run.pool_of_dispatch.get(job.dispatch, "")
        again = dataclasses.replace(job, dispatch=job.dispatch + 1)
        sub = dataclasses.replace(sub, job=again, avoid=sub.avoid + ((failed_pool,) if avoid and failed_pool else ()))
        run.job = again
        log.info("job.redispatch", job_id=job.id, dispatch=again.dispatch, why=why)
        admission = await self._bus.submit(sub, timeout=self._s.submit_timeout, deadline=job.deadline)
        run.pool_of_dispatch[again.dispatch] = admission.pool
        return sub

    async def complete(self, req: ChatCompletionRequest, run: JobRun, sub: Submission) -> ChatCompletion:
        n = req.n or 1
        tally = Tally()
        tally.reset(-1, n)
        async for ev in self.events(run, sub):
            tally.add(ev, n)
            if ev.kind == DONE:
                choices = [Choice(index=i, message=ResponseMessage(content="".join(tally.texts[i]), refusal=None),
                                  logprobs=None, finish_reason=ev.finish[i] if i < len(ev.finish) else "stop")
                           for i in range(n)]
                return ChatCompletion(id=f"chatcmpl-{run.job.id}", created=int(time.time()), model=req.model,
                                      choices=choices, usage=tally.usage(ev))
        raise WorkerFailedError("the job ended without an answer")

    async def stream(self, req: ChatCompletionRequest, run: JobRun, sub: Submission) -> AsyncIterator[str]:
        """SSE `data:` payloads. The first is produced before the HTTP response starts, so any
        error up to then is still an HTTP error; after it, errors become an error event."""
        n = req.n or 1
        enc = ChunkEncoder(id=f"chatcmpl-{run.job.id}", created=int(time.time()), model=req.model,
                           include_usage=req.wants_usage_chunk)
        tally = Tally()
        tally.reset(-1, n)
        events = self.events(run, sub)
        try:
            async for ev in events:
                tally.add(ev, n)
                run.committed = True
                for index, text, _ in ev.pieces:
                    if text:
                        yield enc.content(index, text)
                if ev.kind == DONE:
                    for i in range(n):
                        yield enc.finish(i, ev.finish[i] if i < len(ev.finish) else "stop")
                    if req.wants_usage_chunk:
                        yield enc.usage(tally.usage(ev))
                    yield "[DONE]"
                    return
        except TokenyardError as e:
            if not run.committed:
                raise
            log.warning("job.stream_failed", job_id=run.job.id, error=e.message)
            yield _json_error(e)
        finally:
            await events.aclose()


def _json_error(e: TokenyardError) -> str:
    return json.dumps(e.body(), separators=(",", ":"))
