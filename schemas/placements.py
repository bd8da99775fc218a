"""A job's placement at one dispatch, as the scheduler that placed it recorded it.

One entry of the PLACEMENTS bucket per (job id, dispatch) (`subjects.placement_key`). A
scheduler creates it (a KV create, which fails if the entry exists) before it publishes the
job, as "placing", and rewrites it "placed" once JetStream stored the job: so of any number of
submissions of one job at one dispatch, to any scheduler, before or after a nats-server
restart, one places it and the others answer what it answered (`answer`). `seq` is the work
message's stream sequence when the job went straight to its work queue: a worker handed
another message of the same placement (a copy) can tell it is not the one that was placed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from schemas.codec import WireError, pack_fields, unpack_fields
from schemas.jobs import Admission

State = Literal["placing", "placed"]

PLACING: Final = "placing"  # claimed: its scheduler is publishing it now
PLACED: Final = "placed"  # stored by JetStream (in its work queue, or held in the intake)


@dataclass(frozen=True, slots=True)
class Placement:
    state: State
    at: float  # unix time of the claim
    by: str = ""  # the claim's own random token: a scheduler tells its claim from another's
    scheduler: str = ""  # the claiming scheduler's instance: it answers `subjects.scheduler_alive`
    pool: str = ""
    live_workers: int = 0
    model: str = ""  # as Admission.model: the model placed when a fallback list chose another
    seq: int = 0  # the work message's stream sequence; 0: held in the intake first, or not known yet

    def answer(self) -> Admission:
        """What a second submission of this placement is answered: the first one's placement,
        with no lane (the lane, if any, went with the first answer)."""
        return Admission(pool=self.pool, live_workers=self.live_workers, model=self.model)

    def encode(self) -> bytes:
        return pack_fields(self)

    @classmethod
    def decode(cls, data: bytes) -> Placement:
        placement = unpack_fields(cls, data)
        if placement.state not in (PLACING, PLACED):
            raise WireError(f"bad placement state {placement.state!r}")
        return placement
