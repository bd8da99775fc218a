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

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from scheduler import limits as L
from scheduler.quota import Quota
from schemas import subjects
from schemas.usage import UsageRecord

log = structlog.get_logger(__name__)

USAGE_MAX_AGE = 7 * 86400.0
USAGE_DUPLICATE_WINDOW = 120.0
BATCH = 128
FETCH_WAIT = 1.0
GATHER = 0.05  # after a short batch, let records gather: one pull and one write of acks for many
ACK_WAIT = 30.0
MAX_DELIVER = 5


def usage_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.USAGE_STREAM,
        subjects=[subjects.USAGE_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=USAGE_MAX_AGE,
        duplicate_window=USAGE_DUPLICATE_WINDOW,
        num_replicas=replicas,
    )


async def ensure_usage_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """Idempotent: the gateway creates the same stream; whoever is first wins, the other is a no-op."""
    try:
        await js.add_stream(usage_stream_config(replicas))
    except nats.js.errors.BadRequestError as e:
        log.debug("usage.stream_exists", error=str(e))


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
        while True:
            try:
                msgs = await psub.fetch(BATCH, timeout=FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as e:  # top of a loop: settlement must keep going
                log.warning("usage.fetch_failed", error=repr(e))
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    await self._handle(msg)
                except Exception:  # top of a loop: one record must not stop settlement
                    log.exception("usage.handle_failed")
            if len(msgs) < BATCH:
                await asyncio.sleep(GATHER)

    async def _handle(self, msg: Msg) -> None:
        try:
            record = UsageRecord.decode(msg.data)
        except Exception as e:  # a record nobody can read must not block the others
            log.warning("usage.bad_record", error=str(e))
            await msg.term()
            return
        try:
            await settle_record(self._quota, record, self._clock())
        except Exception:  # top of a loop: leave it for a redelivery
            log.exception("usage.settle_failed", job_id=record.job_id)
            await msg.nak(delay=1.0)
            return
        try:
            self._on_record(record)
        except Exception:
            log.exception("usage.stats_failed", job_id=record.job_id)
        self.settled += 1
        await msg.ack()
