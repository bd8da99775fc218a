"""A job the scheduler admitted but holds back until its pool has room (the intake stream).

Only schedulers read it: it carries the tenant and tier that fair queueing needs, next to the
`Job` a worker will see once it is released to its work queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.codec import need, pack, unpack
from schemas.jobs import Job


@dataclass(frozen=True, slots=True)
class Queued:
    job: Job
    pool: str
    tenant: str
    tier: str
    admitted: float  # unix time it was admitted (queue wait starts here)

    def encode(self) -> bytes:
        return pack(
            {
                "job": self.job.encode(),
                "pool": self.pool,
                "tenant": self.tenant,
                "tier": self.tier,
                "at": self.admitted,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Queued:
        o = unpack(data)
        return cls(
            job=Job.decode(need(o, "job")),
            pool=str(need(o, "pool")),
            tenant=str(o.get("tenant", "")),
            tier=str(o.get("tier", "")),
            admitted=float(o.get("at", 0.0)),
        )
