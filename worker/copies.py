"""Telling a copy of a placed job from the job itself, before running it.

A job is placed once per dispatch (`scheduler.placements`), and the scheduler records the
work message it stored: its stream sequence, in the job's placement entry
(`schemas.placements`). A second message of the same placement (one JetStream's dedupe let
through, e.g. a publish taken over from a scheduler that died mid-placement, across a
nats-server restart) is a copy: running it would take a slot and generate an answer nobody
reads, for a job whose answer is given, or given by the other message. So a worker reads the
entry before it runs a delivery and drops a copy unrun. A redelivery of the placed message
itself (same sequence) runs as before, and so does any delivery whose entry says nothing
(not there: a lane's job, or one held in the intake first, whose sequence is not recorded;
not readable in time): the gateway and the ledger still keep a copy's billing single.
"""

from __future__ import annotations

import asyncio

import nats.errors
import structlog
from nats.aio.client import Client as NATS

from schemas import subjects
from schemas.codec import WireError
from schemas.jobs import Job
from schemas.placements import PLACED, Placement

log = structlog.get_logger(__name__)

LOOKUP_TIMEOUT = 0.5  # seconds a delivery waits for its placement entry before it runs anyway
STATUS = "Status"  # the header a direct get's "not found" (404) or error comes with


async def placed_seq(nc: NATS, job: Job) -> int:
    """The stream sequence of the job's placed work message at its dispatch; 0 when unknown."""
    try:
        reply = await nc.request(subjects.placement_entry(job.id, job.dispatch), b"", timeout=LOOKUP_TIMEOUT)
    except (nats.errors.Error, asyncio.TimeoutError) as e:
        log.debug("job.placement_unknown", error=repr(e))
        return 0
    if reply.headers and reply.headers.get(STATUS):  # no entry (404), or JetStream said no
        return 0
    try:
        placement = Placement.decode(reply.data)
    except WireError as e:
        log.warning("job.bad_placement", error=str(e))
        return 0
    return placement.seq if placement.state == PLACED else 0


async def is_copy(nc: NATS, job: Job, seq: int) -> bool:
    """Whether the delivery at stream sequence `seq` is another message than the one placed."""
    placed = await placed_seq(nc, job)
    return placed != 0 and placed != seq
