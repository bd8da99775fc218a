"""Settlement: read each job's usage record once (across all schedulers) and settle its limits.

Every scheduler pulls from one shared durable consumer (`SETTLE_CONSUMER`) on the usage
stream, so each record is handled by exactly one of them. A record replaces its job's
reservations by the actual tokens and cost, frees its concurrency slot, and feeds the
scheduler's route statistics and circuit breakers (`on_record`). The record is acked only
after its settlement was written, so a scheduler killed mid-way leaves it to another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from scheduler import limits as L
from scheduler.quota import Quota
from schemas import subjects
from schemas.jetstream import consume, decode_batch
from schemas.usage import UsageRecord

log = structlog.get_logger(__name__)

BATCH = 128
FETCH_WAIT = 1.0
GATHER = 0.05  # after a short batch, let records gather: one pull and one write of acks for many
ACK_WAIT = 30.0
MAX_DELIVER = 5


def wants_settling(record: UsageRecord, quota: Quota) -> list[str]:
    """The limit entries this record may hold a reservation in: those the gateway says it
    reserved (`reserved_tokens` > 0), or that exist as far as this scheduler knows."""
    keys = []
    for scope, ident in (("k", record.key_id), ("o", record.org)):
        if ident:
            key = subjects.limits_entry(scope, ident)
            if record.reserved_tokens > 0 or key in quota.known:
                keys.append(key)
    return keys


async def settle_record(quota: Quota, record: UsageRecord, now: float) -> None:
    tokens = max(0, int(record.prompt_tokens) + int(record.completion_tokens))
    cost = max(0.0, float(record.cost or 0.0))
    for key in wants_settling(record, quota):
        await quota.change(key, lambda c: L.settle(c, record.job_id, tokens, cost, now))


class Settler:
    def __init__(
        self,
        js: JetStreamContext,
        quota: Quota,
        *,
        on_record: Callable[[UsageRecord], None],
        clock: Callable[[], float],
    ) -> None:
        self._js = js
        self._quota = quota
        self._on_record = on_record
        self._clock = clock
        self.settled = 0

    async def run(self) -> None:
        config = ConsumerConfig(
            durable_name=subjects.SETTLE_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_deliver=MAX_DELIVER,
            deliver_policy=DeliverPolicy.NEW,
            filter_subject=subjects.USAGE_ALL,
            max_ack_pending=4 * BATCH * 8,
        )
        psub = await self._js.pull_subscribe(
            subjects.USAGE_ALL, durable=subjects.SETTLE_CONSUMER, stream=subjects.USAGE_STREAM, config=config
        )
        await consume(psub, self._handle, name=subjects.SETTLE_CONSUMER, batch=BATCH, wait=FETCH_WAIT, gather=GATHER)

    async def _handle(self, msgs: list[Msg]) -> None:
        for msg, record in await decode_batch(msgs, UsageRecord.decode, name=subjects.SETTLE_CONSUMER):
            await self._settle(msg, record)

    async def _settle(self, msg: Msg, record: UsageRecord) -> None:
        """Acked once settled; a failed settlement is redelivered a moment later."""
        try:
            await settle_record(self._quota, record, self._clock())
        except asyncio.CancelledError:
            raise
        except Exception:  # one record's failure must not stop the batch: it comes back
            log.exception("usage.settle_failed", job_id=record.job_id)
            await msg.nak(delay=1.0)
            return
        self._on_record(record)
        self.settled += 1
        await msg.ack()
