"""The scheduler's Prometheus metrics, on its probe port (`--metrics-port`, default 9464).

Names follow `broker_api.metrics` (`tokenyard_<role>_<what>`, bounded labels, its own
registry). Counters move as admissions happen; gauges are read from the scheduler's state
when scraped (the fleet it heard, its breakers, its fair queues) and from JetStream:

    tokenyard_scheduler_admissions_total{model,result}      result: queued (straight to a work queue),
        held (in the intake, released fairest first) or the refusal's error code
        (no_capacity, queue_full, rate_limit_exceeded, insufficient_quota, ...)
    tokenyard_scheduler_quota_refusals_total{limit}          refusals by the limit that refused (rpm, tpm,
        max_concurrent, tokens_per_day, tokens_per_month, usd_per_day, usd_per_month)
    tokenyard_scheduler_redispatches_total{model}            placements after a failed attempt (failovers)
    tokenyard_scheduler_queue_wait_seconds{pool,model,priority}  admission to the work queue (histogram;
        0 for a job placed at once)
    tokenyard_scheduler_held_jobs{pool,model,priority}       the fair-share backlog held in the intake
    tokenyard_scheduler_work_queue_jobs{pool,model,state}    waiting|running in each work queue
    tokenyard_scheduler_nodes{kind,state}                    live nodes: ready|draining|unhealthy
    tokenyard_scheduler_slots{pool,kind,state}               used|free slots of ready nodes
    tokenyard_scheduler_route_healthy{pool,model}            1 if some healthy node serves it
    tokenyard_scheduler_route_ttft_seconds{pool,model}       moving average of time to first token
    tokenyard_scheduler_route_tokens_per_second{pool,model}  moving average of generation speed
    tokenyard_scheduler_breaker_state{pool,node,model,state} 1 for the state of each node's breaker for a
        model (health follows the node: `scheduler.health`): closed|half_open|open
    tokenyard_scheduler_models                                models some live node serves
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Protocol

import nats.errors
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.fleet import Fleet
from scheduler.health import CLOSED, HALF_OPEN, OPEN, Health
from scheduler.release import Releaser
from schemas.errors import RateLimitError, TokenyardError
from schemas.jetstream import work_queues
from schemas.jobs import NODE_KINDS
from schemas.tenancy import PRIORITY_TIERS

WAIT_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BREAKER_STATES = (CLOSED, HALF_OPEN, OPEN)
NODE_STATES = ("ready", "draining", "unhealthy")
QUOTA_LIMITS = (
    "rpm",
    "tpm",
    "max_concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "usd_per_day",
    "usd_per_month",
)
# A refused job's model goes into labels only when the refusal says the model exists.
UNKNOWN_MODEL_STATUSES = frozenset({400, 404})


class Observed(Protocol):
    """What the metrics read from a scheduler when scraped."""

    fleet: Fleet
    health: Health
    releaser: Releaser


class _State(Collector):
    """Gauges rebuilt from a snapshot taken at each scrape."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.admissions = Counter(
            "tokenyard_scheduler_admissions", "Submissions answered, by result.", ["model", "result"], registry=r
        )
        self.quota_refusals = Counter(
            "tokenyard_scheduler_quota_refusals", "Admissions refused by a limit.", ["limit"], registry=r
        )
        self.redispatches = Counter(
            "tokenyard_scheduler_redispatches", "Placements after a failed attempt.", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            "tokenyard_scheduler_queue_wait_seconds",
            "Admission to the work queue.",
            ["pool", "model", "priority"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        for limit in QUOTA_LIMITS:  # every limit's series exists from the start, at 0
            self.quota_refusals.labels(limit)
        self._state = _State()
        r.register(self._state)

    # --- as admissions happen -----------------------------------------------------------

    def admitted(self, model: str, pool: str, priority: str, *, direct: bool, dispatch: int) -> None:
        self.admissions.labels(model, "queued" if direct else "held").inc()
        self.redispatches.labels(model)  # exists at 0 from the model's first admission
        if direct:
            self.queue_wait.labels(pool, model, priority).observe(0.0)
        if dispatch > 1:
            self.redispatches.labels(model).inc()

    def refused(self, model: str, error: TokenyardError) -> None:
        label = "" if error.status in UNKNOWN_MODEL_STATUSES else model
        self.admissions.labels(label, error.code or error.wire).inc()
        if isinstance(error, RateLimitError) and error.param:
            self.quota_refusals.labels(error.param).inc()

    def released(self, pool: str, model: str, priority: str, waited: float) -> None:
        """A held job went to its work queue after `waited` seconds (`Releaser`'s callback)."""
        self.queue_wait.labels(pool, model, priority).observe(max(0.0, waited))

    # --- when scraped -------------------------------------------------------------------

    async def render(self, scheduler: Observed, js: JetStreamContext) -> tuple[bytes, str]:
        try:
            queues = await work_queues(js)
        except (TimeoutError, nats.errors.Error):
            queues = []
        self._state.families = snapshot(scheduler, queues, time.time())
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def snapshot(scheduler: Observed, queues: list[tuple[str, str, int, int]], now: float) -> list[Metric]:
    """The gauges, from the scheduler's state now and the work queues' depths."""
    work = GaugeMetricFamily(
        "tokenyard_scheduler_work_queue_jobs", "Jobs in each work queue.", labels=["pool", "model", "state"]
    )
    for pool, model, waiting, running in queues:
        work.add_metric([pool, model, "waiting"], waiting)
        work.add_metric([pool, model, "running"], running)
    held = GaugeMetricFamily(
        "tokenyard_scheduler_held_jobs", "Admitted jobs held for fair release.", labels=["pool", "model", "priority"]
    )
    tiers: dict[tuple[str, str], dict[str, int]] = {
        pair: fq.waiting() for pair, fq in scheduler.releaser.queues.items()
    }
    pairs = set(tiers) | {(q[0], q[1]) for q in queues}  # 0 for a queue that holds none
    for pool, model in sorted(pairs):
        for tier in PRIORITY_TIERS:
            held.add_metric([pool, model, tier], tiers.get((pool, model), {}).get(tier, 0))
    return [work, held, *_fleet(scheduler, now), _breakers(scheduler.health)]


def _fleet(scheduler: Observed, now: float) -> list[Metric]:
    nodes = GaugeMetricFamily("tokenyard_scheduler_nodes", "Live nodes.", labels=["kind", "state"])
    slots = GaugeMetricFamily("tokenyard_scheduler_slots", "Slots of ready nodes.", labels=["pool", "kind", "state"])
    by_state: Tally[tuple[str, str]] = Tally()
    used: Tally[tuple[str, str]] = Tally()
    free: Tally[tuple[str, str]] = Tally()
    for node in scheduler.fleet.live_nodes(now):
        state = "draining" if node.draining else "unhealthy" if not node.healthy else "ready"
        by_state[(node.kind, state)] += 1
        if state == "ready":
            used[(node.pool, node.kind)] += max(0, node.slots_total - node.slots_free)
            free[(node.pool, node.kind)] += node.slots_free
    for node_kind in NODE_KINDS:
        for node_state in NODE_STATES:
            nodes.add_metric([node_kind, node_state], by_state[(node_kind, node_state)])
    for pool, pool_kind in sorted(set(used) | set(free)):
        slots.add_metric([pool, pool_kind, "used"], used[(pool, pool_kind)])
        slots.add_metric([pool, pool_kind, "free"], free[(pool, pool_kind)])
    models = scheduler.fleet.models(now)
    healthy = GaugeMetricFamily(
        "tokenyard_scheduler_route_healthy", "1 if a healthy node serves the route.", labels=["pool", "model"]
    )
    ttft = GaugeMetricFamily(
        "tokenyard_scheduler_route_ttft_seconds", "Moving average of time to first token.", labels=["pool", "model"]
    )
    tps = GaugeMetricFamily(
        "tokenyard_scheduler_route_tokens_per_second", "Moving average of tokens per second.", labels=["pool", "model"]
    )
    for m in models:
        for route in scheduler.fleet.routes(m.id, now):
            healthy.add_metric([route.pool, m.id], 1.0 if route.healthy else 0.0)
            stats = scheduler.health.stats.get((route.pool, m.id))
            if stats is not None and stats.samples:
                ttft.add_metric([route.pool, m.id], stats.ttft_ms / 1e3)
                tps.add_metric([route.pool, m.id], stats.tokens_per_s)
    known = GaugeMetricFamily("tokenyard_scheduler_models", "Models some live node serves.", value=len(models))
    return [nodes, slots, healthy, ttft, tps, known]


def _breakers(health: Health) -> Metric:
    family = GaugeMetricFamily(
        "tokenyard_scheduler_breaker_state",
        "1 for the state each node's breaker for a model is in.",
        labels=["pool", "node", "model", "state"],
    )
    for (pool, node, model), breaker in sorted(health.breakers.items()):
        for state in BREAKER_STATES:
            family.add_metric([pool, node, model, state], 1.0 if breaker.state == state else 0.0)
    return family
