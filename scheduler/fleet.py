"""The scheduler's view of the fleet, built from worker adverts. Pure: time is passed in.

A node is live while its adverts keep coming: silence for `MISSED_ADVERTS` of its own
advertised intervals means gone. A model stays *known* for `remember` seconds after its last
live node went away, so a request for it gets "no capacity right now" (503) rather than
"no such model" (404) while its workers restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from schemas.jobs import ModelAdvert, NodeAdvert

MISSED_ADVERTS = 3


@dataclass(slots=True)
class NodeState:
    advert: NodeAdvert
    seen: float

    def live(self, now: float) -> bool:
        return now - self.seen <= MISSED_ADVERTS * max(self.advert.interval, 0.05)


@dataclass(frozen=True, slots=True)
class PoolView:
    """One pool's capacity for one model, as placement sees it."""

    pool: str
    nodes: int
    slots_total: int
    slots_free: int


class Fleet:
    def __init__(self, *, remember: float = 600.0) -> None:
        self._nodes: dict[str, NodeState] = {}
        self._models: dict[str, tuple[ModelAdvert, float]] = {}  # id -> (advert, last seen live)
        self._remember = remember

    def observe(self, advert: NodeAdvert, now: float) -> None:
        self._nodes[advert.node] = NodeState(advert, now)
        for m in advert.models:
            self._models[m.id] = (m, now)

    def prune(self, now: float) -> None:
        for node, state in list(self._nodes.items()):
            if not state.live(now):
                del self._nodes[node]
        for model, (_, seen) in list(self._models.items()):
            if now - seen > self._remember:
                del self._models[model]

    def live_nodes(self, now: float) -> Iterable[NodeAdvert]:
        return (s.advert for s in self._nodes.values() if s.live(now))

    def pools_for(self, model: str, now: float) -> list[PoolView]:
        pools: dict[str, list[NodeAdvert]] = {}
        for node in self.live_nodes(now):
            if node.draining or not any(m.id == model for m in node.models):
                continue
            pools.setdefault(node.pool, []).append(node)
        return [PoolView(pool, len(nodes), sum(n.slots_total for n in nodes), sum(n.slots_free for n in nodes))
                for pool, nodes in sorted(pools.items())]

    def known(self, model: str) -> bool:
        return model in self._models

    def models(self, now: float) -> list[ModelAdvert]:
        """Models some live node serves now, by id."""
        live = {m.id: m for node in self.live_nodes(now) if not node.draining for m in node.models}
        return [live[k] for k in sorted(live)]
