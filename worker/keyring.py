"""Key rotation and provider health for a cloud adapter: pure state, no I/O, a clock passed in.

A `Keyring` hands out a provider's keys round-robin, skipping keys that are cooling down
(after a 429) or revoked (after a 401/403, until the worker restarts). `ProviderHealth`
keeps the result of the last probe and, per model, a `ModelHealth` breaker fed by real
traffic: health is scoped to (provider, model), so one model's errors never take the
provider's other models out. Keys are named by index and fingerprint here; the secrets stay
with the caller.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]


class ErrorWindow:
    """Outcomes of the last `window` seconds (at most `limit` of them), for an error rate."""

    def __init__(self, *, clock: Clock, window: float = 60.0, limit: int = 256) -> None:
        self._clock = clock
        self._window = window
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=limit)

    def record(self, ok: bool) -> None:
        self._outcomes.append((self._clock(), ok))

    def _recent(self) -> list[bool]:
        since = self._clock() - self._window
        while self._outcomes and self._outcomes[0][0] < since:
            self._outcomes.popleft()
        return [ok for _, ok in self._outcomes]

    def counts(self) -> tuple[int, int]:
        """(failures, samples) within the window."""
        recent = self._recent()
        return recent.count(False), len(recent)

    def rate(self) -> float:
        failures, samples = self.counts()
        return failures / samples if samples else 0.0


@dataclass(slots=True)
class _Key:
    fingerprint: str
    errors: ErrorWindow
    revoked: bool = False
    cooling_until: float = 0.0
    strikes: int = 0  # 429s in a row: each one doubles the default cooldown
    uses: int = 0


class Keyring:
    """Round-robin over usable keys. A key is usable unless revoked or still cooling down."""

    def __init__(
        self,
        fingerprints: Sequence[str],
        *,
        clock: Clock = time.monotonic,
        base_cooldown: float = 1.0,
        max_cooldown: float = 300.0,
        window: float = 60.0,
    ) -> None:
        if not fingerprints:
            raise ValueError("a keyring needs at least one key")
        self._clock = clock
        self._base = base_cooldown
        self._max = max_cooldown
        self._keys = [_Key(fp, ErrorWindow(clock=clock, window=window)) for fp in fingerprints]
        self._next = 0

    def __len__(self) -> int:
        return len(self._keys)

    def fingerprint(self, index: int) -> str:
        return self._keys[index].fingerprint

    def _ready(self, key: _Key, now: float) -> bool:
        return not key.revoked and key.cooling_until <= now

    def _first_ready(self, exclude: frozenset[int]) -> int | None:
        now = self._clock()
        n = len(self._keys)
        for step in range(n):
            i = (self._next + step) % n
            if i not in exclude and self._ready(self._keys[i], now):
                return i
        return None

    def pick(self, exclude: frozenset[int] = frozenset()) -> int | None:
        """The next usable key after the last one picked, or None if none is usable now."""
        i = self._first_ready(exclude)
        if i is not None:
            self._next = (i + 1) % len(self._keys)
            self._keys[i].uses += 1
        return i

    def peek(self) -> int | None:
        """The key `pick` would give, without moving the rotation (for probes)."""
        return self._first_ready(frozenset())

    def cool(self, index: int, retry_after: float | None = None) -> float:
        """Rate-limited: rest the key for `retry_after` seconds, else an exponential backoff."""
        key = self._keys[index]
        key.strikes += 1
        key.errors.record(False)
        if retry_after is None:
            delay = self._base * 2 ** min(key.strikes - 1, 30)
        else:
            delay = retry_after
        delay = min(max(delay, 0.0), self._max)
        key.cooling_until = max(key.cooling_until, self._clock() + delay)
        return delay

    def revoke(self, index: int) -> None:
        """Rejected (401/403): never used again by this process."""
        key = self._keys[index]
        key.revoked = True
        key.errors.record(False)

    def succeeded(self, index: int) -> None:
        key = self._keys[index]
        key.strikes = 0
        key.errors.record(True)

    def failed(self, index: int) -> None:
        self._keys[index].errors.record(False)

    def usable(self) -> bool:
        """Some key is not revoked (it may be cooling down)."""
        return any(not k.revoked for k in self._keys)

    def ready_in(self) -> float | None:
        """Seconds until some key is usable: 0 if one is now, None if every key is revoked."""
        now = self._clock()
        waits = [max(k.cooling_until - now, 0.0) for k in self._keys if not k.revoked]
        return min(waits) if waits else None

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for k in self._keys:
            failures, samples = k.errors.counts()
            state = "revoked" if k.revoked else "cooling" if k.cooling_until > now else "ok"
            out.append(
                {
                    "fingerprint": k.fingerprint,
                    "state": state,
                    "cooldown_left": round(max(k.cooling_until - now, 0.0), 3),
                    "uses": k.uses,
                    "errors": failures,
                    "samples": samples,
                }
            )
        return out


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    window: float = 60.0  # seconds of traffic the error rate looks at
    max_error_rate: float = 0.5  # out above this ...
    min_samples: int = 4  # ... once at least this many requests were seen
    timeouts: int = 2  # first-token timeouts in a row that take a model out at once
    cooldown: float = 5.0  # seconds out before the model is tried again ...
    max_cooldown: float = 60.0  # ... doubling up to this while its tries keep failing


class ModelHealth:
    """One (provider, model)'s health from its real requests: a circuit breaker.

        in --(an error rate above `max_error_rate` over >= `min_samples`, or `timeouts`
              first-token timeouts in a row)--> out for `cooldown`
        out --(cooldown passed)--> on trial: healthy again, its next result decides
        on trial --(a success)--> in;  --(a failure)--> out for twice as long (at most `max_cooldown`)

    Out, the adapter advertises the model unhealthy and schedulers place none of its jobs
    there; its other models are not affected. After the cooldown the next job placed is the
    probe that brings a recovered model back.
    """

    def __init__(self, *, clock: Clock, policy: HealthPolicy) -> None:
        self._clock = clock
        self._policy = policy
        self._errors = ErrorWindow(clock=clock, window=policy.window)
        self._timeouts = 0
        self._out_until = 0.0
        self._cooldown = policy.cooldown
        self._on_trial = False

    def record(self, ok: bool, *, timeout: bool = False) -> None:
        self._errors.record(ok)
        if ok:
            self._timeouts = 0
            if self._on_trial:
                self._on_trial, self._cooldown = False, self._policy.cooldown
            return
        self._timeouts = self._timeouts + 1 if timeout else 0
        failures, samples = self._errors.counts()
        p = self._policy
        too_many = samples >= p.min_samples and failures / samples > p.max_error_rate
        if self._on_trial or self._timeouts >= p.timeouts or too_many:
            if self._on_trial:
                self._cooldown = min(self._cooldown * 2, p.max_cooldown)
            self._out_until = self._clock() + self._cooldown
            self._on_trial, self._timeouts = False, 0
            self._errors = ErrorWindow(clock=self._clock, window=p.window)  # judged afresh once back

    def healthy(self) -> bool:
        if self._out_until:
            if self._clock() < self._out_until:
                return False
            self._out_until, self._on_trial = 0.0, True
        return True

    def snapshot(self) -> dict[str, Any]:
        failures, samples = self._errors.counts()
        left = max(self._out_until - self._clock(), 0.0) if self._out_until else 0.0
        return {
            "healthy": self.healthy(),
            "on_trial": self._on_trial,
            "out_for": round(left, 3),
            "error_rate": round(failures / samples, 3) if samples else 0.0,
            "errors": failures,
            "samples": samples,
        }


class ProviderHealth:
    """The provider's last probe (is it there at all?) and each model's `ModelHealth`."""

    def __init__(self, *, clock: Clock = time.monotonic, policy: HealthPolicy = HealthPolicy()) -> None:
        self._clock = clock
        self._policy = policy
        self._models: dict[str, ModelHealth] = {}
        self._probe_ok: bool | None = None
        self._probe_at: float | None = None
        self._probe_latency: float | None = None

    def model(self, name: str) -> ModelHealth:
        health = self._models.get(name)
        if health is None:
            health = self._models[name] = ModelHealth(clock=self._clock, policy=self._policy)
        return health

    def probed(self, ok: bool, latency: float) -> None:
        self._probe_ok = ok
        self._probe_at = self._clock()
        self._probe_latency = latency

    def healthy(self) -> bool:
        """The provider answers (its last probe did, or none ran yet)."""
        return self._probe_ok is not False

    def snapshot(self) -> dict[str, Any]:
        age = None if self._probe_at is None else round(self._clock() - self._probe_at, 3)
        latency = None if self._probe_latency is None else round(self._probe_latency * 1000, 1)
        return {"probe": {"ok": self._probe_ok, "age": age, "latency_ms": latency}}
