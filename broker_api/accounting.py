"""Publishing usage records and audit events to JetStream, off the request's critical path.

Each record is published with its id as `Nats-Msg-Id`, so retries after a lost ack are
duplicates JetStream drops; the ledgers then store it once. Publishing happens in background
tasks; `flush` waits for them at shutdown so nothing accepted is dropped on a clean stop.

`stored` runs once JetStream has the record: the job's worker is told then that it need not
report the job itself (`broker_api.bus`), so a gateway killed before its record was stored
leaves the job to its worker's report, never unbilled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats.errors
import structlog
from nats.js import JetStreamContext

from schemas import subjects
from schemas.usage import AuditEvent, UsageRecord

log = structlog.get_logger(__name__)

PATIENCE = 90.0  # seconds a record is retried (past a leader election, 4-9 s), inside the 120 s dedupe window
BACKOFF = (0.2, 2.0)


class Accounts:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._pending: set[asyncio.Task[None]] = set()

    def usage(self, record: UsageRecord, *, stored: Callable[[], Awaitable[None]] | None = None) -> None:
        self._spawn(subjects.usage_subject(record.job_id), record.encode(), record.job_id, stored)

    def audit(self, event: AuditEvent) -> None:
        self._spawn(subjects.audit_subject(event.id), event.encode(), event.id)

    def _spawn(
        self, subject: str, data: bytes, msg_id: str, stored: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        task = asyncio.create_task(self._publish(subject, data, msg_id, stored))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(
        self, subject: str, data: bytes, msg_id: str, stored: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        # The same message id every time: a publish whose ack was lost is a duplicate JetStream drops.
        deadline = time.monotonic() + PATIENCE
        pause, attempt = BACKOFF[0], 0
        while True:
            try:
                await self._js.publish(subject, data, timeout=2.0, headers={"Nats-Msg-Id": msg_id})
                if stored is not None:
                    await stored()
                return
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                if time.monotonic() + pause > deadline:
                    log.error("accounting.publish_failed", subject=subject, attempts=attempt + 1, error=str(e))
                    return
                log.warning("accounting.publish_retry", subject=subject, attempt=attempt, error=str(e))
            await asyncio.sleep(pause)
            pause, attempt = min(BACKOFF[1], pause * 2), attempt + 1

    async def flush(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
