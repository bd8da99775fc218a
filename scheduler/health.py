"""Health of the routes: moving averages per (pool, model) and a circuit breaker per node and
model, (pool, node, model).

Health follows the node. A job is placed on a (pool, model) work queue that every node of the
pool serving the model pulls from; the scheduler can never aim it at one node. So a route is
usable while some live, healthy node of it has a breaker that lets a job through, and one
node's failures (its jobs died with it, went silent, lost events, or its backend failed them)
open that node's breaker only: its siblings keep the route open, and its share of the route's
slots is no longer counted. For a cloud route the node is the adapter of one provider, so its
breaker per model is the (provider, model)'s health: one model's errors never take the
provider's other models out with it.

Fed by usage records (outcome, route, node, TTFT, duration) and by re-dispatches (a submission
names the pool and node the attempt before it failed on). Pure: time is passed in.

A breaker:

    closed --(N failures in a row, or error rate >= R over >= M samples)--> open
    open --(cooldown passed; the next job placed on its route is a probe)--> half-open
    half-open --(a success)--> closed;  --(a failure)--> open (cooldown again)

An open breaker's node gets no share of new jobs; a route whose nodes are all open gets none at
all, and one whose usable nodes are all half-open gets one probe at a time (another if the
probe's result does not come within `probe_timeout`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.usage import UsageRecord

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
ALPHA = 0.2  # weight of the newest sample in the moving averages
MAX_BREAKERS = 65_536  # (pool, node, model) triples remembered; nodes come and go

BreakerKey = tuple[str, str, str]  # (pool, node, model)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 5  # consecutive failures that open it
    error_rate: float = 0.5  # ... or this moving error rate
    min_samples: int = 10  # ... once it has seen this many outcomes
    cooldown: float = 10.0  # seconds open before a probe
    probe_timeout: float = 30.0  # seconds a probe may take before another is let through


@dataclass(slots=True)
class Breaker:
    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: str = CLOSED
    streak: int = 0  # consecutive failures
    error_rate: float = 0.0
    samples: int = 0
    opened_at: float = 0.0
    probe_at: float | None = None

    def allows(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now - self.opened_at >= self.config.cooldown
        return self.probe_at is None or now - self.probe_at >= self.config.probe_timeout

    def placed(self, now: float) -> None:
        """A job was placed on this breaker's route: if it is not closed, that job is the probe."""
        if self.state != CLOSED and self.allows(now):
            self.state = HALF_OPEN
            self.probe_at = now

    def record(self, ok: bool, now: float) -> None:
        self.samples += 1
        self.error_rate += ALPHA * ((0.0 if ok else 1.0) - self.error_rate)
        if ok:
            self.streak = 0
            if self.state == HALF_OPEN:  # late successes of jobs placed before it opened prove nothing
                self.state, self.probe_at, self.error_rate = CLOSED, None, 0.0
            return
        self.streak += 1
        c = self.config
        if self.state == HALF_OPEN or (
            self.state == CLOSED
            and (self.streak >= c.failures or (self.samples >= c.min_samples and self.error_rate >= c.error_rate))
        ):
            self.state, self.opened_at, self.probe_at = OPEN, now, None


@dataclass(slots=True)
class RouteStats:
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    duration_s: float = 0.0
    samples: int = 0

    def add(self, ttft_ms: float, tokens: int, duration_ms: float) -> None:
        gen_s = max(duration_ms - ttft_ms, 1.0) / 1000.0
        tps = tokens / gen_s if tokens > 0 else 0.0
        if self.samples == 0:
            self.ttft_ms, self.tokens_per_s, self.duration_s = ttft_ms, tps, duration_ms / 1000.0
        else:
            self.ttft_ms += ALPHA * (ttft_ms - self.ttft_ms)
            if tps:
                self.tokens_per_s += ALPHA * (tps - self.tokens_per_s)
            self.duration_s += ALPHA * (duration_ms / 1000.0 - self.duration_s)
        self.samples += 1


def is_failure(record: UsageRecord) -> bool | None:
    """True: the route failed; False: it served; None: says nothing about the route."""
    if record.outcome == "ok":
        return False
    if record.outcome == "error" and (record.status == 0 or record.status >= 500) and record.status != 504:
        return True  # 4xx is the request's fault; 504 is the client's deadline, not the route's
    return None


class Health:
    def __init__(self, config: BreakerConfig | None = None) -> None:
        self._config = config or BreakerConfig()
        self.breakers: dict[BreakerKey, Breaker] = {}
        self.stats: dict[tuple[str, str], RouteStats] = {}

    def breaker(self, pool: str, node: str, model: str) -> Breaker:
        key = (pool, node, model)
        b = self.breakers.get(key)
        if b is None:
            if len(self.breakers) >= MAX_BREAKERS:
                self._forget_closed()
            b = self.breakers[key] = Breaker(self._config)
        return b

    def _forget_closed(self) -> None:
        """Closed breakers hold nothing an empty one would not, bar their moving error rate."""
        for key in [k for k, b in self.breakers.items() if b.state == CLOSED]:
            del self.breakers[key]

    def allows(self, pool: str, node: str, model: str, now: float) -> bool:
        b = self.breakers.get((pool, node, model))
        return b is None or b.allows(now)

    def usable(self, pool: str, model: str, nodes: Iterable[str], now: float) -> list[str]:
        """The nodes of a route whose breakers let a job through now."""
        return [n for n in nodes if self.allows(pool, n, model, now)]

    def closed(self, pool: str, model: str, nodes: Iterable[str]) -> bool:
        """Every node of the route is closed: nothing is on probation there."""
        for n in nodes:
            b = self.breakers.get((pool, n, model))
            if b is not None and b.state != CLOSED:
                return False
        return True

    def placed(self, pool: str, model: str, nodes: Iterable[str], now: float) -> None:
        """A job went to the route: every breaker of it due for a probe now has one."""
        for n in nodes:
            b = self.breakers.get((pool, n, model))
            if b is not None:
                b.placed(now)

    def failed(self, pool: str, node: str, model: str, now: float) -> None:
        """An attempt failed there (a re-dispatch says so before the job's record comes)."""
        if pool and node:
            self.breaker(pool, node, model).record(False, now)

    def observe(self, record: UsageRecord, now: float) -> None:
        if not record.route or record.route == "cache":
            return
        verdict = is_failure(record)
        if verdict is not None and record.node:
            self.breaker(record.route, record.node, record.model).record(not verdict, now)
        if record.outcome == "ok" and record.duration_ms > 0:
            key = (record.route, record.model)
            s = self.stats.get(key)
            if s is None:
                s = self.stats[key] = RouteStats()
            s.add(record.ttft_ms, record.completion_tokens, record.duration_ms)
