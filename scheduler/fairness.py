"""Fair queueing of held jobs: priority tiers by weight, tenants round robin, aging. Pure.

One `FairQueue` per (pool, model). Which job goes next:

1. aging: if the next job of some tier has waited longer than `aging` seconds, the oldest
   such job goes first, whatever its tier (nothing waits forever behind a busier tier);
2. otherwise the tiers share releases by weight (stride scheduling: interactive 8, standard
   3, batch 1), so interactive is served first under load and batch still progresses;
3. within a tier, tenants take turns (round robin): one tenant's flood waits behind its own
   jobs, never in front of another tenant's.

A tier that was empty re-enters at the current virtual time, so idling earns no burst.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from schemas.tenancy import DEFAULT_TIER, PRIORITY_TIERS

T = TypeVar("T")

TIER_WEIGHTS = {"interactive": 8.0, "standard": 3.0, "batch": 1.0}
AGING = 30.0


@dataclass(frozen=True, slots=True)
class Item(Generic[T]):
    value: T
    tenant: str
    tier: str
    since: float  # when it started waiting


class _Tier(Generic[T]):
    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.passed = 0.0  # virtual time of its next turn
        self.tenants: OrderedDict[str, deque[Item[T]]] = OrderedDict()
        self.size = 0

    def push(self, item: Item[T]) -> None:
        q = self.tenants.get(item.tenant)
        if q is None:
            q = self.tenants[item.tenant] = deque()
        q.append(item)
        self.size += 1

    def head(self) -> Item[T]:
        return next(iter(self.tenants.values()))[0]

    def pop(self) -> Item[T]:
        tenant, q = next(iter(self.tenants.items()))
        item = q.popleft()
        if q:
            self.tenants.move_to_end(tenant)  # its next job waits for every other tenant's turn
        else:
            del self.tenants[tenant]
        self.size -= 1
        return item


class FairQueue(Generic[T]):
    def __init__(self, weights: dict[str, float] | None = None, *, aging: float = AGING) -> None:
        weights = weights or TIER_WEIGHTS
        self._tiers = {t: _Tier[T](weights.get(t, 1.0)) for t in PRIORITY_TIERS}
        self._aging = aging
        self._vtime = 0.0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, item: Item[T]) -> None:
        tier = self._tiers.get(item.tier) or self._tiers[DEFAULT_TIER]  # type: ignore[call-overload]
        if tier.size == 0:
            tier.passed = max(tier.passed, self._vtime)
        tier.push(item)
        self._size += 1

    def pop(self, now: float) -> Item[T] | None:
        busy = [t for t in self._tiers.values() if t.size]
        if not busy:
            return None
        aged = [t for t in busy if now - t.head().since > self._aging]
        if aged:
            tier = min(aged, key=lambda t: t.head().since)
        else:
            tier = min(busy, key=lambda t: t.passed)  # ties: the higher tier (dict order)
        self._vtime = max(self._vtime, tier.passed)
        tier.passed += 1.0 / tier.weight
        self._size -= 1
        return tier.pop()

    def waiting(self) -> dict[str, int]:
        return {name: t.size for name, t in self._tiers.items()}

    def items(self) -> list[Item[T]]:
        return [item for t in self._tiers.values() for q in t.tenants.values() for item in q]
