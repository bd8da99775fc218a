"""Billing the jobs whose gateway died: workers' reports become usage records here.

A gateway killed mid-answer leaves its jobs running on workers that soon find it gone; each
publishes a `schemas.usage.WorkerReport` (`worker.reports`). Every gateway reads the orphans
stream through one shared durable consumer, so each report is handled by exactly one of them,
and for each:

1. waits until `grace` seconds after the report: a gateway that was only cut off for a moment
   (a NATS reconnect) still writes its own record, which is the one to keep;
2. opens the report's ticket (`broker_api.tickets`); one that no gateway sealed for this job id
   is dropped (a forgery, or a report moved onto another job);
3. drops the report if the job already has a usage record;
4. otherwise publishes the job's record: tenant, key, project and model from the ticket,
   counts from the report held to the ticket's bounds (completion to the request's token
   limit, prompt to a multiple of the gateway's estimate, cached to the prompt), the node and
   price as for any attempt (`broker_api.attribution`: an enrolled node is named, at its
   owner's price, only if the report carries its signed claim; else `unverified`),
   `counted_by: "worker"`. Its message id is
   the job id, so JetStream's dedupe and the ledgers' primary key keep one row per job, should
   the gateway's own record arrive after all.

The report is acked once its record is stored (or it was dropped); a gateway killed mid-way
leaves it to another, and the record's message id makes the retry a duplicate at worst.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from broker_api.attribution import Attribution
from broker_api.tickets import Tickets
from schemas import subjects
from schemas.events import Claim
from schemas.jetstream import consume, decode_batch
from schemas.jobs import ATTEMPTS_PER_DISPATCH
from schemas.usage import Ticket, UsageRecord, WorkerReport

log = structlog.get_logger(__name__)

BATCH = 64
FETCH_WAIT = 1.0
ACK_WAIT = 30.0
PROMPT_BOUND = 4  # a report's prompt may exceed the gateway's estimate this many times at most
PROMPT_SLACK = 256  # ... plus this many tokens (tokenizers count differently)
INTERRUPTED = 502  # the status of a record whose gateway died: the client's answer was cut off

Attribute = Callable[[Claim, str], Attribution]  # (an attempt's claim, its pool) -> its node and price


def orphan_record(report: WorkerReport, ticket: Ticket, attribution: Attribution) -> UsageRecord:
    """The usage record of a job billed from its worker's report (see the module docstring)."""
    price = attribution.price
    prompt = min(max(0, int(report.prompt_tokens)), PROMPT_BOUND * ticket.prompt_estimate + PROMPT_SLACK)
    completion = max(0, int(report.completion_tokens))
    if ticket.max_completion > 0:
        completion = min(completion, ticket.max_completion)
    cached = min(max(0, int(report.cached_tokens)), prompt)
    if price is not None:  # an enrolled node: its owner's price, never the node's own claim
        cost = price.cost(prompt, completion)
    else:
        claimed = max(0.0, float(report.cost or 0.0))
        asked = max(1, int(report.prompt_tokens) + int(report.completion_tokens))
        cost = claimed * min(1.0, (prompt + completion) / asked)  # scaled down with capped counts
    return UsageRecord(
        job_id=report.job_id,
        time=ticket.arrived,
        org=ticket.org,
        project=ticket.project,
        key_id=ticket.key_id,
        model=ticket.model,
        route=report.pool,
        node=attribution.node,
        attempts=max(1, report.attempt // ATTEMPTS_PER_DISPATCH),
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cost=round(cost, 10),
        ttft_ms=0.0,
        duration_ms=round(max(0.0, report.time - ticket.arrived) * 1e3, 3),
        outcome="cancelled",  # the answer never reached its end at the client
        status=INTERRUPTED,
        stream=ticket.stream,
        reserved_tokens=ticket.reserved_tokens,
        counted_by="worker",
    )


class Orphans:
    """The shared consumer of workers' reports; `run` until cancelled."""

    def __init__(
        self,
        js: JetStreamContext,
        tickets: Tickets,
        *,
        grace: float,
        attribute: Attribute = lambda claim, pool: Attribution(claim.node, None),
    ) -> None:
        self._js = js
        self._tickets = tickets
        self._grace = grace
        self._attribute = attribute
        self.recorded = 0

    async def run(self) -> None:
        config = ConsumerConfig(
            durable_name=subjects.ORPHANS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_deliver=-1,  # a report waits (nak with delay) through its grace: never given up
            filter_subject=subjects.ORPHAN_ALL,
        )
        psub = await self._js.pull_subscribe(
            subjects.ORPHAN_ALL, durable=subjects.ORPHANS_CONSUMER, stream=subjects.ORPHANS_STREAM, config=config
        )
        await consume(psub, self._handle, name=subjects.ORPHANS_CONSUMER, batch=BATCH, wait=FETCH_WAIT)

    async def _handle(self, msgs: list[Msg]) -> None:
        for msg, report in await decode_batch(msgs, WorkerReport.decode, name=subjects.ORPHANS_CONSUMER):
            await self._one(msg, report)

    async def _one(self, msg: Msg, report: WorkerReport) -> None:
        wait = report.time + self._grace - time.time()
        if wait > 0:
            await msg.nak(delay=min(wait, self._grace) + 0.05)
            return
        jlog = log.bind(job_id=report.job_id, node=report.node)
        ticket = self._tickets.open(report.job_id, report.ticket)
        if ticket is None:
            jlog.warning("orphan.bad_ticket")
            await msg.term()
            return
        if await self._recorded(report.job_id):
            jlog.info("orphan.already_recorded")
            await msg.ack()
            return
        claim = Claim(report.job_id, report.attempt, report.node, report.proof)
        record = orphan_record(report, ticket, self._attribute(claim, report.pool))
        await self._js.publish(
            subjects.usage_subject(record.job_id), record.encode(), timeout=5.0, headers={"Nats-Msg-Id": record.job_id}
        )
        self.recorded += 1
        jlog.info(
            "orphan.recorded",
            completion_tokens=record.completion_tokens,
            prompt_tokens=record.prompt_tokens,
            reason=report.reason,
        )
        await msg.ack()

    async def _recorded(self, job_id: str) -> bool:
        try:
            await self._js.get_last_msg(subjects.USAGE_STREAM, subjects.usage_subject(job_id))
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, asyncio.TimeoutError):
            raise  # unknown: the report comes back after the ack wait
        return True
