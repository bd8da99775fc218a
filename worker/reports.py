"""Reports of jobs whose gateway is gone: what an attempt generated, so the job is still billed.

A worker learns its gateway is gone when a heartbeat finds no responder or goes unanswered
`GATEWAY_MISSES` times, or when its final DONE, sent as a request, is not answered
(`worker.runtime`). The gateway then cannot write the job's usage record, so the worker
publishes a `schemas.usage.WorkerReport` to the orphans stream instead: the counts it has, and
the job's ticket, which the gateway sealed and only gateways can open. It learns nothing about
the tenant. A gateway turns the report into the job's usage record (`broker_api.orphans`).

Published in the background with the job id as message id (a retry after a lost ack is a
duplicate), so a slow or briefly unavailable JetStream never holds the job's slot.
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
import structlog
from nats.js import JetStreamContext

from schemas import subjects
from schemas.jobs import Job
from schemas.usage import WorkerReport
from worker.backend import Usage

log = structlog.get_logger(__name__)

ATTEMPTS = 8  # publishes of one report before it is given up (about 25 s of backoff)


class Reporter:
    def __init__(self, js: JetStreamContext, *, node: str, pool: str) -> None:
        self._js = js
        self._node = node
        self._pool = pool
        self._pending: set[asyncio.Task[None]] = set()

    def unless(
        self,
        heard: asyncio.Task[bool],
        job: Job,
        attempt: int,
        usage: Usage,
        *,
        started: float,
        reason: str,
        proof: bytes = b"",
    ) -> None:
        """Report a finished attempt if `heard` (its DONE's answer) comes back False: no gateway
        said the job's usage record is stored."""

        async def wait() -> None:
            try:
                billed = await heard
            except nats.errors.Error:
                billed = False
            if not billed:
                self.report(job, attempt, usage, started=started, finished=True, reason=reason, proof=proof)

        task = asyncio.create_task(wait())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def report(
        self, job: Job, attempt: int, usage: Usage, *, started: float, finished: bool, reason: str, proof: bytes = b""
    ) -> None:
        """Publish what `attempt` of `job` used, off the caller's path; `proof`: the node's
        signature of the attempt's claim (`worker.identity`), so that an enrolled node is named
        on the record it leads to."""
        if not job.ticket:  # a gateway too old to seal tickets: nobody could bill the report
            log.warning("job.orphan_unbillable", job_id=job.id, attempt=attempt, reason=reason)
            return
        report = WorkerReport(
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
        task = asyncio.create_task(self._publish(report))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, report: WorkerReport) -> None:
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
                return
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                log.warning("job.orphan_report_retry", job_id=report.job_id, attempt=attempt, error=str(e))
                await asyncio.sleep(min(0.2 * 2**attempt, 8.0))
        log.error("job.orphan_report_failed", job_id=report.job_id)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
