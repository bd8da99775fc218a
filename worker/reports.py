"""Reports of jobs whose gateway is gone: what an attempt generated, so the job is still billed.

A worker learns its gateway is gone when a heartbeat finds no responder or none is answered
for the gateway patience (`worker.beats`), or when its final DONE, sent as a request, is not answered
(`worker.runtime`). The gateway then cannot write the job's usage record, so the worker
publishes a `schemas.usage.WorkerReport` to the orphans stream instead: the counts it has, and
the job's ticket, which the gateway sealed and only gateways can open. It learns nothing about
the tenant. A gateway turns the report into the job's usage record (`broker_api.orphans`).

Published in the background with the job id as message id (a retry after a lost ack is a
duplicate), so a slow or briefly unavailable JetStream never holds the job's slot.

The job's work message is the durable record that the job ran and is not billed yet: the
worker settles it (`Reporter` gets it) only once the job's usage record is stored (the gateway
answered the final DONE) or its own report is (JetStream acked the publish), and keeps it
meanwhile (`in_progress`). So a worker that dies in between, with its gateway dead too, leaves
the message to be redelivered; whoever pulls it again runs it, finds the gateway gone and
reports it (and a gateway still alive answers it "stop": its record is its own). The ledger's
key and the report's message id keep that to one record per job. No write is added per job:
the message is acked anyway, only later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import subjects
from schemas.jobs import Job
from schemas.usage import WorkerReport
from worker.backend import Usage

log = structlog.get_logger(__name__)

ATTEMPTS = 8  # publishes of one report before it is given up (about 25 s of backoff)

Settle = Callable[[], Awaitable[None]]  # a work message's ack or term


class Reporter:
    def __init__(self, js: JetStreamContext, *, node: str, pool: str, ack_wait: float) -> None:
        """`ack_wait`: the work consumer's, so a message kept while its job's billing is
        unsettled is marked in progress well within it."""
        self._js = js
        self._node = node
        self._pool = pool
        self._keep_every = max(0.05, ack_wait / 3)
        self._pending: set[asyncio.Task[None]] = set()

    def unless(
        self,
        heard: asyncio.Task[bool],
        job: Job,
        attempt: int,
        usage: Usage,
        *,
        msg: Msg,
        started: float,
        reason: str,
        proof: bytes = b"",
        finished: bool = True,
    ) -> None:
        """Report an attempt if `heard` (its final DONE's answer) comes back False: no gateway
        said the job's usage record is stored. `msg`, the job's work message, is acked once the
        record or the report is stored, and kept until then. `finished`: it ran to its end (not
        stopped)."""

        async def wait() -> None:
            try:
                billed = await heard
            except nats.errors.Error:
                billed = False
            if billed:
                await _settle(msg.ack)
                return
            report = self._report(job, attempt, usage, started=started, finished=finished, reason=reason, proof=proof)
            if report is None:
                await _settle(msg.ack)
                return
            await self._publish(report, msg.ack)

        self._spawn(self._kept(msg, wait()))

    def report(
        self,
        job: Job,
        attempt: int,
        usage: Usage,
        *,
        msg: Msg,
        started: float,
        finished: bool,
        reason: str,
        proof: bytes = b"",
    ) -> None:
        """Publish what `attempt` of `job` used, off the caller's path; `proof`: the node's
        signature of the attempt's claim (`worker.identity`), so that an enrolled node is named
        on the record it leads to. `msg` is terminated once the report is stored."""
        report = self._report(job, attempt, usage, started=started, finished=finished, reason=reason, proof=proof)
        if report is None:
            self._spawn(_settle(msg.term))
            return
        self._spawn(self._kept(msg, self._publish(report, msg.term)))

    def _report(
        self, job: Job, attempt: int, usage: Usage, *, started: float, finished: bool, reason: str, proof: bytes
    ) -> WorkerReport | None:
        if not job.ticket:  # a gateway too old to seal tickets: nobody could bill the report
            log.warning("job.orphan_unbillable", job_id=job.id, attempt=attempt, reason=reason)
            return None
        return WorkerReport(
            job_id=job.id,
            ticket=job.ticket,
            node=self._node,
            pool=self._pool,
            model=job.model,
            attempt=attempt,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cost=usage.cost,
            started=started,
            time=time.time(),
            finished=finished,
            reason=reason,
            proof=proof,
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _kept(self, msg: Msg, work: Awaitable[None]) -> None:
        """`work`, with `msg` marked in progress meanwhile: JetStream redelivers it only if this
        worker dies (or is cut off) before the job's billing is settled."""

        async def keep() -> None:
            while True:
                await asyncio.sleep(self._keep_every)
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()

        keeping = asyncio.create_task(keep())
        try:
            await work
        finally:
            keeping.cancel()

    async def _publish(self, report: WorkerReport, settle: Settle) -> None:
        """Publish `report`, then `settle` its work message. A report never stored leaves the
        message unsettled: JetStream redelivers it after its ack wait, and it is run (and
        reported) again."""
        data = report.encode()
        for attempt in range(ATTEMPTS):
            try:
                await self._js.publish(
                    subjects.orphan_subject(report.job_id), data, timeout=2.0, headers={"Nats-Msg-Id": report.job_id}
                )
                log.info(
                    "job.orphan_reported",
                    job_id=report.job_id,
                    attempt=report.attempt,
                    completion_tokens=report.completion_tokens,
                    reason=report.reason,
                )
                await _settle(settle)
                return
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                log.warning("job.orphan_report_retry", job_id=report.job_id, attempt=attempt, error=str(e))
                await asyncio.sleep(min(0.2 * 2**attempt, 8.0))
        log.error("job.orphan_report_failed", job_id=report.job_id, redelivered=True)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)


async def _settle(settle: Settle) -> None:
    with contextlib.suppress(nats.errors.Error):
        await settle()
