"""Lanes: placing a key's next jobs straight on a work queue, as a scheduler allowed.

A scheduler that placed a job of a key with no limits on a work queue whose pool has idle slots
may grant the gateway a lane in its answer: up to N more jobs of that key and model (no more
than those idle slots) may go to that queue within T seconds without asking (see
`scheduler.service`, "Lanes", for when it does). A lane publishes with the job's usual message
id, so a job placed twice (a lane's publish whose ack was lost, then a normal submission) runs
once. Whatever a lane cannot place (used up, expired, refused by the stream) goes through a
scheduler as usual: a lane only ever saves a round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext

from schemas import subjects
from schemas.jobs import Admission, Submission
from schemas.rules import lane_eligible

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT = 2.0
MAX_LANES = 4096  # beyond this, expired lanes are swept on the next grant

LaneKey = tuple[str, str]  # (key id, model)


@dataclass(slots=True)
class Lane:
    pool: str
    credits: int
    until: float  # monotonic


class Lanes:
    def __init__(self, js: JetStreamContext, *, enabled: bool = True) -> None:
        self._js = js
        self.enabled = enabled
        self._lanes: dict[LaneKey, Lane] = {}
        self.placed = 0  # jobs placed through a lane (for /metrics and tests)

    def key_of(self, sub: Submission) -> LaneKey | None:
        """The lane this submission could use, if any could serve it (the scheduler decides
        the rest when it grants one)."""
        if not self.enabled or not lane_eligible(sub):
            return None
        return (sub.key_id, sub.job.model)

    def grant(self, key: LaneKey, answer: Admission) -> None:
        if answer.lane_credits <= 0 or not answer.pool:
            return
        now = time.monotonic()
        if len(self._lanes) >= MAX_LANES:
            self._lanes = {k: lane for k, lane in self._lanes.items() if lane.until > now}
            if len(self._lanes) >= MAX_LANES:
                return
        self._lanes[key] = Lane(answer.pool, answer.lane_credits, now + answer.lane_ttl)

    async def place(self, key: LaneKey, sub: Submission) -> Admission | None:
        """The job placed through its lane, or None: ask a scheduler."""
        lane = self._lanes.get(key)
        if lane is None:
            return None
        if lane.credits <= 0 or time.monotonic() >= lane.until:
            del self._lanes[key]
            return None
        lane.credits -= 1
        job = sub.job
        try:
            await self._js.publish(
                subjects.work_subject(lane.pool, job.model),
                job.encode(),
                timeout=PUBLISH_TIMEOUT,
                headers={"Nats-Msg-Id": job.message_id},
            )
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as e:  # full queue, gone stream, slow
            self._lanes.pop(key, None)
            log.info("lane.refused", job_id=job.id, pool=lane.pool, error=repr(e))
            return None
        self.placed += 1
        return Admission(pool=lane.pool)
