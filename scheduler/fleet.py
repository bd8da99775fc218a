"""The scheduler's view of the fleet, built from worker adverts. Pure: time is passed in.

A node is live while its adverts keep coming: silence for `MISSED_ADVERTS` of its own
advertised intervals means gone. A model stays *known* for `remember` seconds after its last
live node went away, so a request for it gets "no capacity right now" (503) rather than
"no such model" (404) while its workers restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.routing import Member, Route
from schemas.jobs import ModelAdvert, NodeAdvert

MISSED_ADVERTS = 3
ROUTES_FRESH = 0.05  # seconds a model's routes are reused: adverts are a second old anyway


@dataclass(slots=True)
class NodeState:
    advert: NodeAdvert
    seen: float

    def live(self, now: float) -> bool:
        return now - self.seen <= MISSED_ADVERTS * max(self.advert.interval, 0.05)


class Fleet:
    def __init__(self, *, remember: float = 600.0) -> None:
        self._nodes: dict[str, NodeState] = {}
        self._models: dict[str, tuple[ModelAdvert, float]] = {}  # id -> (advert, last seen live)
        self._remember = remember
        self._routes: dict[str, tuple[float, list[Route]]] = {}  # model -> (built at, routes)

    def observe(self, advert: NodeAdvert, now: float) -> None:
        before = self._nodes.get(advert.node)
        self._nodes[advert.node] = NodeState(advert, now)
        for m in advert.models:
            self._models[m.id] = (m, now)
        if before is not None and _health(before.advert) != _health(advert):
            for m in advert.models:  # a node or model just went out (or back): no stale routes
                self._routes.pop(m.id, None)

    def forget(self, node: str) -> None:
        """A node that may no longer serve (disabled, removed): no more jobs for it, now."""
        if self._nodes.pop(node, None) is not None:
            self._routes.clear()

    def prune(self, now: float) -> None:
        for node, state in list(self._nodes.items()):
            if not state.live(now):
                del self._nodes[node]
        for model, (_, seen) in list(self._models.items()):
            if now - seen > self._remember:
                del self._models[model]

    def live_nodes(self, now: float) -> Iterable[NodeAdvert]:
        return (s.advert for s in self._nodes.values() if s.live(now))

    def routes(self, model: str, now: float) -> list[Route]:
        """One `Route` per pool with a live, non-draining node serving `model` (health and
        queue facts are the caller's to add). Rebuilt at most every ROUTES_FRESH seconds."""
        cached = self._routes.get(model)
        if cached is not None and 0 <= now - cached[0] < ROUTES_FRESH:
            return cached[1]
        pools: dict[str, list[tuple[NodeAdvert, ModelAdvert]]] = {}
        for node in self.live_nodes(now):
            if node.draining:
                continue
            for m in node.models:
                if m.id == model:
                    pools.setdefault(node.pool, []).append((node, m))
                    break
        routes = [_route(pool, model, offers) for pool, offers in sorted(pools.items())]
        self._routes[model] = (now, routes)
        if len(self._routes) > 4096:
            self._routes.clear()
        return routes

    def known(self, model: str) -> bool:
        return model in self._models

    def models(self, now: float) -> list[ModelAdvert]:
        """Models some live node serves now, by id."""
        live = {m.id: m for node in self.live_nodes(now) if not node.draining for m in node.models}
        return [live[k] for k in sorted(live)]


def _health(advert: NodeAdvert) -> tuple[bool, bool, tuple[bool, ...]]:
    return advert.healthy, advert.draining, tuple(m.healthy for m in advert.models)


def _route(pool: str, model: str, offers: list[tuple[NodeAdvert, ModelAdvert]]) -> Route:
    healthy = [(n, m) for n, m in offers if n.healthy and m.healthy]
    kinds = {n.kind for n, _ in offers}
    kind = "volunteer" if "volunteer" in kinds else "cloud" if kinds == {"cloud"} else "own"
    return Route(
        pool=pool,
        model=model,
        kind=kind,
        nodes=len(healthy),
        slots_total=sum(n.slots_total for n, _ in healthy),
        slots_free=sum(n.slots_free for n, _ in healthy),
        input_price=max((m.input_price for _, m in offers), default=0.0),
        output_price=max((m.output_price for _, m in offers), default=0.0),
        context_length=min((m.context_length for _, m in offers if m.context_length > 0), default=0),
        healthy=bool(healthy),
        members=tuple(Member(n.node, n.slots_total, n.slots_free) for n, _ in healthy),
        prefill=bool(healthy) and all(m.assistant_prefill for _, m in healthy),  # any of them may pull the job
    )
