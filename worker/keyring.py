"""Key rotation and provider health for a cloud adapter: pure state, no I/O, a clock passed in.

A `Keyring` hands out a provider's keys round-robin, skipping keys that are cooling down
(after a 429) or revoked (after a 401/403, until the worker restarts). `ProviderHealth`
keeps the passive error rate of real traffic and the result of the last probe. Keys are
named by index and fingerprint here; the secrets stay with the caller.
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
    max_error_rate: float = 0.5  # unhealthy above this ...
    min_samples: int = 4  # ... once at least this many requests were seen


class ProviderHealth:
    """Passive error rate of real requests plus the last probe's result."""

    def __init__(self, *, clock: Clock = time.monotonic, policy: HealthPolicy = HealthPolicy()) -> None:
        self._clock = clock
        self._policy = policy
        self._errors = ErrorWindow(clock=clock, window=policy.window)
        self._probe_ok: bool | None = None
        self._probe_at: float | None = None
        self._probe_latency: float | None = None

    def record(self, ok: bool) -> None:
        self._errors.record(ok)

    def probed(self, ok: bool, latency: float) -> None:
        self._probe_ok = ok
        self._probe_at = self._clock()
        self._probe_latency = latency

    def healthy(self) -> bool:
        failures, samples = self._errors.counts()
        too_many = samples >= self._policy.min_samples and failures / samples > self._policy.max_error_rate
        return self._probe_ok is not False and not too_many

    def snapshot(self) -> dict[str, Any]:
        failures, samples = self._errors.counts()
        age = None if self._probe_at is None else round(self._clock() - self._probe_at, 3)
        latency = None if self._probe_latency is None else round(self._probe_latency * 1000, 1)
        return {
            "error_rate": round(failures / samples, 3) if samples else 0.0,
            "errors": failures,
            "samples": samples,
            "probe": {"ok": self._probe_ok, "age": age, "latency_ms": latency},
        }
