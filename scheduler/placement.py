"""Placement: which pool's queue a job goes to. Pure functions, no I/O.

Today's policy: among the pools with a live node for the model (minus pools this job already
failed on), the one with the most free slots, then the most slots; the queue absorbs bursts
when every slot is busy. Routing policies (cheapest, fastest, weighted split, ordered
failover) replace `choose_pool` without touching the service around it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from schemas.errors import ModelNotFoundError, NoCapacityError
from scheduler.fleet import PoolView

NO_CAPACITY_RETRY_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class Placement:
    pool: str
    live_nodes: int


def choose_pool(model: str, pools: list[PoolView], *, known: bool, avoid: Collection[str] = ()) -> Placement:
    if not pools:
        if not known:
            raise ModelNotFoundError(f"The model `{model}` does not exist or you do not have access to it.",
                                     param="model")
        raise NoCapacityError(f"No worker is serving the model `{model}` right now. Try again shortly.",
                              retry_after=NO_CAPACITY_RETRY_AFTER)
    candidates = [p for p in pools if p.pool not in avoid] or pools
    best = max(candidates, key=lambda p: (p.slots_free, p.slots_total, p.pool))
    return Placement(best.pool, sum(p.nodes for p in pools))
