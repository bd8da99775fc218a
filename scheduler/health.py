"""Health of the routes: moving averages per (pool, model) and a circuit breaker per pool.

Fed by usage records (outcome, route, TTFT, duration) and by re-dispatches (a submission
that avoids a pool says that pool just failed an attempt). Pure: time is passed in.

The breaker of a pool:

    closed --(N failures in a row, or error rate >= R over >= M samples)--> open
    open --(cooldown passed; the next job placed there is a probe)--> half-open
    half-open --(probe succeeded)--> closed;  --(probe failed)--> open (cooldown again)

An open pool gets no new jobs; a half-open pool gets one probe at a time (another if the
probe's result does not come within `probe_timeout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.usage import UsageRecord

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
ALPHA = 0.2  # weight of the newest sample in the moving averages


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
        """A job was placed on this pool: if it is not closed, that job is the probe."""
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
        self.breakers: dict[str, Breaker] = {}
        self.stats: dict[tuple[str, str], RouteStats] = {}

    def breaker(self, pool: str) -> Breaker:
        b = self.breakers.get(pool)
        if b is None:
            b = self.breakers[pool] = Breaker(self._config)
        return b

    def allows(self, pool: str, now: float) -> bool:
        b = self.breakers.get(pool)
        return b is None or b.allows(now)

    def closed(self, pool: str) -> bool:
        b = self.breakers.get(pool)
        return b is None or b.state == CLOSED

    def placed(self, pool: str, now: float) -> None:
        b = self.breakers.get(pool)
        if b is not None:
            b.placed(now)

    def failed(self, pool: str, now: float) -> None:
        self.breaker(pool).record(False, now)

    def observe(self, record: UsageRecord, now: float) -> None:
        if not record.route or record.route == "cache":
            return
        verdict = is_failure(record)
        if verdict is not None:
            self.breaker(record.route).record(not verdict, now)
        if record.outcome == "ok" and record.duration_ms > 0:
            key = (record.route, record.model)
            s = self.stats.get(key)
            if s is None:
                s = self.stats[key] = RouteStats()
            s.add(record.ttft_ms, record.completion_tokens, record.duration_ms)
