"""Node and provider lifecycle in the audit log: a worker joining, draining and leaving the
fleet, and turning unhealthy or healthy again (a cloud adapter whose provider went down).

Every ledger (the ledger role, and a gateway that keeps one) watches the workers' adverts and
records `node.join` (with the pool, kind, models and, for priced routes, the prices it
charges), `node.unhealthy`, `node.healthy`, `node.drain` and `node.leave`. Event ids derive
from the node, its start time and the time its health changed, so the same event seen by
several watchers is one row (JetStream dedupe, then the ledger's primary key).

It also keeps each node's latest advert and when it came (`last`), for the node registry's
live view (`broker_api.nodes`), and which pools the operator's cloud adapters serve
(`cloud_pools`), which no enrolled node may join.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas import subjects
from schemas.jobs import NodeAdvert, WireError
from schemas.tenancy import ROOT_ORG
from schemas.usage import AuditEvent

log = structlog.get_logger(__name__)

MISSED_ADVERTS = 3
REMEMBERED = 10_000  # nodes whose last advert is kept after they left


@dataclass(slots=True)
class _Seen:
    advert: NodeAdvert
    last: float
    draining: bool = False


class FleetWatch:
    def __init__(self, nc: NATS, audit: Callable[[AuditEvent], None]) -> None:
        self._nc = nc
        self._audit = audit
        self._nodes: dict[str, _Seen] = {}
        self._last: dict[str, tuple[NodeAdvert, float]] = {}  # node -> (advert, unix time), also after it left
        self._cloud: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def last(self, node: str) -> tuple[NodeAdvert, float] | None:
        """A node's latest advert and the unix time it came, if any came since this gateway started."""
        return self._last.get(node)

    def cloud_pools(self) -> set[str]:
        """Pools some cloud adapter advertised since this gateway started."""
        return set(self._cloud)

    async def start(self) -> None:
        await self._nc.subscribe(subjects.FLEET_HEARTBEAT_ALL, cb=self._on_advert)
        self._task = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _event(self, action: str, advert: NodeAdvert, suffix: str = "") -> None:
        detail = {
            "pool": advert.pool,
            "kind": advert.kind,
            "models": [m.id for m in advert.models],
            "slots": advert.slots_total,
        }
        prices = {
            m.id: {"input": m.input_price, "output": m.output_price}
            for m in advert.models
            if m.input_price or m.output_price
        }
        if prices:
            detail["prices"] = prices
        self._audit(
            AuditEvent(
                id=f"{action}.{advert.node}.{advert.started:.6f}{suffix}",
                time=time.time(),
                org=ROOT_ORG,
                actor=advert.node,
                action=action,
                target=advert.node,
                source="fleet",
                detail=detail,
            )
        )

    async def _on_advert(self, msg: Msg) -> None:
        try:
            advert = NodeAdvert.decode(msg.data)
        except WireError:
            return
        now = time.monotonic()
        self._last.pop(advert.node, None)  # re-inserted last: the oldest is dropped first
        self._last[advert.node] = (advert, time.time())
        if len(self._last) > REMEMBERED:
            del self._last[next(iter(self._last))]
        if advert.kind == "cloud":
            self._cloud.add(advert.pool)
        seen = self._nodes.get(advert.node)
        if seen is None or seen.advert.started != advert.started:
            self._event("node.join", advert)
            if not advert.healthy:
                self._event("node.unhealthy", advert, f".{advert.health_since:.6f}")
            seen = self._nodes[advert.node] = _Seen(advert, now)
        elif advert.healthy != seen.advert.healthy:
            self._event("node.healthy" if advert.healthy else "node.unhealthy", advert, f".{advert.health_since:.6f}")
        # an idle-time node whose owner is back advertises itself draining too (paused): that is
        # not the node shutting down, and it happens at every return of the owner
        if advert.draining and not advert.paused and not seen.draining:
            self._event("node.drain", advert)
            seen.draining = True
        seen.advert, seen.last = advert, now

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for node, seen in list(self._nodes.items()):
                if now - seen.last > MISSED_ADVERTS * max(seen.advert.interval, 0.05):
                    self._event("node.leave", seen.advert)
                    del self._nodes[node]
