"""The worker's Prometheus metrics, on its probe port (`--metrics-port`, default 9465).

Names follow `broker_api.metrics` (`tokenyard_<role>_<what>`, bounded labels, its own
registry):

    tokenyard_worker_jobs_total{model,outcome}          attempts that ended: done|failed|stopped|expired
    tokenyard_worker_tokens_total{model}                 completion tokens streamed
    tokenyard_worker_job_duration_seconds{model}         pull to the end of the attempt (histogram)
    tokenyard_worker_queue_wait_seconds{model}           stored in the work queue to pulled (histogram)
    tokenyard_worker_running_jobs                        attempts running now
    tokenyard_worker_slots{state}                        used|free
    tokenyard_worker_healthy                             1 while the backend says it can serve
    tokenyard_worker_info{node,pool,kind,backend}        1 (who this worker is)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.jobs import NodeAdvert

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Advertised(Protocol):
    """What the metrics read from a worker when scraped."""

    def advert(self) -> NodeAdvert: ...

    @property
    def running_jobs(self) -> int: ...


class _State(Collector):
    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class WorkerMetrics:
    def __init__(self, *, backend: str) -> None:
        self.backend = backend
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("tokenyard_worker_jobs", "Attempts that ended.", ["model", "outcome"], registry=r)
        self.tokens = Counter("tokenyard_worker_tokens", "Completion tokens streamed.", ["model"], registry=r)
        self.duration = Histogram(
            "tokenyard_worker_job_duration_seconds", "Pull to the end.", ["model"], buckets=BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "tokenyard_worker_queue_wait_seconds", "Stored to pulled.", ["model"], buckets=BUCKETS, registry=r
        )
        self._state = _State()
        r.register(self._state)

    def pulled(self, model: str, waited: float) -> None:
        self.queue_wait.labels(model).observe(max(0.0, waited))

    def ended(self, model: str, outcome: str, *, tokens: int, seconds: float) -> None:
        self.jobs.labels(model, outcome).inc()
        self.tokens.labels(model).inc(max(0, tokens))
        self.duration.labels(model).observe(max(0.0, seconds))

    async def render(self, worker: Advertised) -> tuple[bytes, str]:
        advert = worker.advert()
        running = GaugeMetricFamily("tokenyard_worker_running_jobs", "Attempts running now.", value=worker.running_jobs)
        slots = GaugeMetricFamily("tokenyard_worker_slots", "Slots of this worker.", labels=["state"])
        slots.add_metric(["used"], max(0, advert.slots_total - advert.slots_free))
        slots.add_metric(["free"], advert.slots_free)
        healthy = GaugeMetricFamily(
            "tokenyard_worker_healthy", "1 while the backend can serve.", value=1.0 if advert.healthy else 0.0
        )
        info = GaugeMetricFamily(
            "tokenyard_worker_info", "Who this worker is.", labels=["node", "pool", "kind", "backend"]
        )
        info.add_metric([advert.node, advert.pool, advert.kind, self.backend], 1.0)
        self._state.families = [running, slots, healthy, info]
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
