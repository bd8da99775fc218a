"""The gateway's Prometheus metrics, at `/metrics` (prometheus-client, in this app's own registry).

Names, for every role: `tokenyard_<role>_<what>` (role `api`, `scheduler`, `worker`, `ledger`),
so a dashboard's query names the role it reads and the roles' series never collide in one
Prometheus. Labels are bounded: model ids the fleet serves, pool names, statuses, outcomes,
tiers, kinds; never a job id, key id, org or client-chosen text (a 400/404's model is left out:
a client could name any model).

The gateway's (the scheduler's are in `scheduler.metrics`, the worker's in `worker.metrics`):

    tokenyard_api_requests_total{model,route,status,outcome}   chat completions that ended, refusals
        included; outcome ok|cached|cancelled|error|replayed|refused|invalid; route = the pool
        that served ("" if none did, "cache" for a cache hit)
    tokenyard_api_http_requests_total{handler,method,status}   every HTTP request, by route template
    tokenyard_api_tokens_total{model,route,kind}                prompt|completion tokens billed
    tokenyard_api_request_duration_seconds{model}               arrival to the last byte (histogram)
    tokenyard_api_time_to_first_token_seconds{model}            arrival to the first token (histogram)
    tokenyard_api_inflight_requests                              chat completions being served now
    tokenyard_api_cache_requests_total{result}                   hit|miss|bypass of the response cache
    tokenyard_api_failovers_total{model}                         extra dispatches after a failed attempt
    tokenyard_api_continuations_total{model}                     answers continued on another node mid-way
    tokenyard_api_lane_placements_total                          jobs placed through a scheduler's lane
    tokenyard_api_work_queue_jobs{pool,model,state}              waiting|running in each work queue (JetStream)
    tokenyard_api_ledger_lag_records{stream}                     records not yet in this gateway's ledger
    tokenyard_api_loop_behind_seconds_total                      time this gateway's event loop ran behind
        (`broker_api.lag`: its workers' words waited unread meanwhile, and did not count as silence)

Per request this costs a few dict look-ups and atomic adds (prometheus-client's children are
cached per label set); the queue and ledger gauges are read from JetStream when scraped.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.jetstream import work_queues

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A model id goes into labels only with these statuses: the fleet knew the model.
MODEL_STATUSES = frozenset({200, 429, 499, 502, 503, 504})

Queues = list[tuple[str, str, int, int]]  # (pool, model, waiting, running)


@dataclass(slots=True)
class Meter:
    """What the chat service learnt about the HTTP request it serves (`broker_api.observe`)."""

    model: str = ""
    route: str = ""
    outcome: str = ""  # from the usage record: ok, cached, cancelled, error
    status: int = 0  # the record's status (a stream that failed after its 200 says 502 here)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    recorded: bool = False


# The meter of the request being served in this context (set by `broker_api.observe`): a
# context variable, so each request sees only its own.
METER: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("tokenyard_meter", default=None)


class _Scraped(Collector):
    """Values read when scraped (JetStream queues, lanes, ledger lag), kept from the last read."""

    def __init__(self) -> None:
        self.queues: Queues = []
        self.lanes = 0
        self.ledger_lag: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        q = GaugeMetricFamily(
            "tokenyard_api_work_queue_jobs", "Jobs in each work queue.", labels=["pool", "model", "state"]
        )
        for pool, model, waiting, running in self.queues:
            q.add_metric([pool, model, "waiting"], waiting)
            q.add_metric([pool, model, "running"], running)
        yield q
        yield CounterMetricFamily(
            "tokenyard_api_lane_placements", "Jobs this gateway placed through a scheduler's lane.", value=self.lanes
        )
        lag = GaugeMetricFamily(
            "tokenyard_api_ledger_lag_records", "Records not yet stored in this gateway's ledger.", labels=["stream"]
        )
        for stream, n in sorted(self.ledger_lag.items()):
            lag.add_metric([stream], n)
        yield lag


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tokenyard_api_requests",
            "Chat completion requests that ended, refusals included.",
            ["model", "route", "status", "outcome"],
            registry=r,
        )
        self.http = Counter(
            "tokenyard_api_http_requests",
            "HTTP requests, by route template.",
            ["handler", "method", "status"],
            registry=r,
        )
        self.tokens = Counter("tokenyard_api_tokens", "Tokens billed.", ["model", "route", "kind"], registry=r)
        self.duration = Histogram(
            "tokenyard_api_request_duration_seconds", "Arrival to the end.", ["model"], buckets=BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "tokenyard_api_time_to_first_token_seconds",
            "Arrival to the first token.",
            ["model"],
            buckets=BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("tokenyard_api_inflight_requests", "Chat completions being served now.", registry=r)
        self.cache = Counter("tokenyard_api_cache_requests", "Response cache look-ups.", ["result"], registry=r)
        self.failovers = Counter("tokenyard_api_failovers", "Dispatches after a failed attempt.", ["model"], registry=r)
        self.continuations = Counter(
            "tokenyard_api_continuations", "Answers continued on another node mid-way.", ["model"], registry=r
        )
        self.loop_behind = Counter(
            "tokenyard_api_loop_behind_seconds", "Seconds this gateway's event loop ran behind.", registry=r
        )
        self.scraped = _Scraped()
        r.register(self.scraped)

    # --- per request --------------------------------------------------------------------

    def finished(
        self,
        *,
        model: str,
        outcome: str,
        status: int,
        prompt: int,
        completion: int,
        seconds: float,
        ttft: float | None,
        route: str = "",
        attempts: int = 1,
    ) -> None:
        """A request that ran (it has a usage record): its tokens, times and failovers. The
        request itself is counted once by the HTTP edge (`broker_api.observe`)."""
        meter = METER.get()
        if meter is not None:
            meter.route, meter.outcome, meter.status, meter.recorded = route, outcome, status, True
            meter.prompt_tokens, meter.completion_tokens = prompt, completion
        self.tokens.labels(model, route, "prompt").inc(prompt)
        self.tokens.labels(model, route, "completion").inc(completion)
        self.duration.labels(model).observe(seconds)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        # the rare events' series exist (at 0) once the model ran: a dashboard's query finds
        # them before the first failover (never earlier: a refused request's model is a client's text)
        self.failovers.labels(model).inc(max(0, attempts - 1))
        self.continuations.labels(model)

    def opened(self, model: str) -> None:
        """The chat service took the request for `model` (which is known only if it is admitted)."""
        meter = METER.get()
        if meter is not None:
            meter.model = model

    def behind(self, seconds: float) -> None:
        """The event loop woke `seconds` late (`broker_api.lag`)."""
        self.loop_behind.inc(seconds)

    def continued(self, model: str) -> None:
        self.continuations.labels(model).inc()

    def ended(self, *, model: str, route: str, status: int, outcome: str) -> None:
        """One chat completion request ended (counted by the HTTP edge)."""
        self.requests.labels(model if status in MODEL_STATUSES else "", route, str(status), outcome).inc()

    # --- scraping -----------------------------------------------------------------------

    async def render(
        self,
        js: JetStreamContext,
        *,
        lanes: int,
        ledger_lag: Callable[[], Awaitable[dict[str, int]]] | None = None,
    ) -> tuple[bytes, str]:
        self.scraped.queues = await queue_depths(js)
        self.scraped.lanes = lanes
        if ledger_lag is not None:
            self.scraped.ledger_lag = await ledger_lag()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def queue_depths(js: JetStreamContext) -> Queues:
    """(pool, model, waiting, running) for every work-queue consumer ([] if JetStream is away)."""
    try:
        return await work_queues(js)
    except (TimeoutError, nats.errors.Error):
        return []


async def consumer_lag(js: JetStreamContext, consumers: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Messages each durable consumer has not yet acknowledged: {label: (stream, durable)}."""
    out: dict[str, int] = {}
    for label, (stream, durable) in consumers.items():
        try:
            info: Any = await js.consumer_info(stream, durable, timeout=1.0)
        except (TimeoutError, nats.errors.Error):
            continue
        out[label] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    return out
