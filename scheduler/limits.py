"""Admission limits as pure functions over one subject's counters (a key or an org).

One `Counters` value is one KV entry (bucket `ty_limits`), changed only by compare-and-set,
so every scheduler decides on the same, latest state and a limit holds across replicas.
Everything a subject needs lives in that one entry, so a limited request costs one CAS per
subject:

- rpm and tpm are GCRA (a leaky bucket stored as one "theoretical arrival time" each): a
  request costing `c` units under a limit of `L` per minute is admitted iff
  `max(tat, now) + c * 60/L - now <= 60`. This admits exactly `L` requests in any burst and
  never more than `L` per rolling minute, with one float of state.
- token and money caps per UTC day and month are plain counters, reset when the period turns.
- `held` maps each admitted, unsettled job id to what it reserved. Its length is the
  concurrency in use; a job id already held makes admission a no-op (a retried submission or
  a re-dispatch reserves once); settling replaces the reservation by the actual numbers.
  A reservation nobody settles (its gateway died) expires at `expires` and frees its slot;
  its tokens and money stay charged as reserved, the safe side of a budget.

Time is passed in; nothing here does I/O.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field, replace
from typing import Any

from schemas.codec import WireError, pack, unpack
from schemas.errors import RateLimitError
from schemas.tenancy import Limits

WINDOW = 60.0  # seconds: rpm and tpm are per rolling minute
CONCURRENCY_RETRY_AFTER = 1.0
EPSILON = 1e-6

# held[job_id] = [tokens, usd, expires, rpm_seconds, tpm_seconds_per_token, day]
Held = list[Any]


@dataclass(frozen=True, slots=True)
class Counters:
    rpm_tat: float = 0.0
    tpm_tat: float = 0.0
    day: int = 0  # days since the epoch (UTC) the day counters belong to
    tokens_day: int = 0
    usd_day: float = 0.0
    month: int = 0  # year * 12 + month - 1 the month counters belong to
    tokens_month: int = 0
    usd_month: float = 0.0
    held: dict[str, Held] = field(default_factory=dict)

    def encode(self) -> bytes:
        return pack(
            {
                "rpm": self.rpm_tat,
                "tpm": self.tpm_tat,
                "day": self.day,
                "td": self.tokens_day,
                "ud": self.usd_day,
                "month": self.month,
                "tm": self.tokens_month,
                "um": self.usd_month,
                "held": self.held,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Counters:
        """An entry's counters; a WireError for bytes that are not (the caller decides)."""
        o = unpack(data)
        try:
            return cls(
                float(o.get("rpm", 0.0)),
                float(o.get("tpm", 0.0)),
                int(o.get("day", 0)),
                int(o.get("td", 0)),
                float(o.get("ud", 0.0)),
                int(o.get("month", 0)),
                int(o.get("tm", 0)),
                float(o.get("um", 0.0)),
                {str(k): list(v) for k, v in dict(o.get("held") or {}).items()},
            )
        except (TypeError, ValueError) as e:
            raise WireError(f"bad limit counters: {e}") from e

    @property
    def in_flight(self) -> int:
        return len(self.held)


def day_of(now: float) -> int:
    return int(now // 86400)


@functools.lru_cache(maxsize=64)
def _month_of_day(day: int) -> int:
    d = dt.datetime.fromtimestamp(day * 86400.0, dt.timezone.utc)
    return d.year * 12 + d.month - 1


def month_of(now: float) -> int:
    return _month_of_day(day_of(now))


def seconds_to_next_day(now: float) -> float:
    return (day_of(now) + 1) * 86400.0 - now


def seconds_to_next_month(now: float) -> float:
    m = month_of(now) + 1
    start = dt.datetime(m // 12, m % 12 + 1, 1, tzinfo=dt.timezone.utc).timestamp()
    return start - now


def roll(c: Counters, now: float) -> Counters:
    """Drop expired reservations and reset the counters of a period that ended."""
    day, month = day_of(now), month_of(now)
    changes: dict[str, Any] = {}
    if c.held and min(h[2] for h in c.held.values()) <= now:
        changes["held"] = {j: h for j, h in c.held.items() if h[2] > now}
    if c.day != day:
        changes.update(day=day, tokens_day=0, usd_day=0.0)
    if c.month != month:
        changes.update(month=month, tokens_month=0, usd_month=0.0)
    return replace(c, **changes) if changes else c


@dataclass(frozen=True, slots=True)
class Ask:
    """What one admission reserves."""

    job_id: str
    tokens: int  # prompt estimate + max_tokens
    usd: float  # an upper bound of its cost on the chosen route
    expires: float  # unix time the reservation lapses if never settled


def _gcra_wait(tat: float, cost: float, limit: int, now: float) -> tuple[float, float]:
    """(seconds to wait before `cost` fits, seconds it adds). Zero wait: it fits now."""
    per = WINDOW / limit
    add = cost * per
    return max(0.0, max(tat, now) + add - now - WINDOW), add


def _refuse(what: str, limit: float, retry_after: float, scope: str, name: str) -> RateLimitError:
    """`name` is the limit's field (`param`: the metrics count refusals by it)."""
    code = "insufficient_quota" if "per day" in what or "per month" in what else "rate_limit_exceeded"
    return RateLimitError(
        f"Rate limit reached for {scope}: {what} (limit {limit:g}). Try again in {retry_after:.1f} s.",
        param=name,
        code=code,
        retry_after=max(1.0, retry_after),
    )


def reserve(c: Counters, limits: Limits, ask: Ask, now: float, *, scope: str = "this key") -> Counters:
    """The counters with `ask` admitted, or raises RateLimitError (429 with retry_after).

    Idempotent: a job id already held returns the counters unchanged.
    """
    c = roll(c, now)
    if ask.job_id in c.held:
        return c
    refusals: list[RateLimitError] = []
    if limits.max_concurrent and c.in_flight >= limits.max_concurrent:
        refusals.append(
            _refuse("requests in flight", limits.max_concurrent, CONCURRENCY_RETRY_AFTER, scope, "max_concurrent")
        )
    rpm_add = tpm_per = 0.0
    if limits.rpm:
        wait, rpm_add = _gcra_wait(c.rpm_tat, 1, limits.rpm, now)
        if wait > EPSILON:
            refusals.append(_refuse("requests per minute", limits.rpm, wait, scope, "rpm"))
    if limits.tpm:
        if ask.tokens > limits.tpm:
            refusals.append(
                RateLimitError(
                    f"Request too large for {scope}: {ask.tokens} tokens asked, limit {limits.tpm} tokens per minute. "
                    "Lower max_tokens or the prompt.",
                    param="tpm",
                    code="rate_limit_exceeded",
                    retry_after=WINDOW,
                )
            )
        else:
            wait, _ = _gcra_wait(c.tpm_tat, ask.tokens, limits.tpm, now)
            tpm_per = WINDOW / limits.tpm
            if wait > EPSILON:
                refusals.append(_refuse("tokens per minute", limits.tpm, wait, scope, "tpm"))
    caps = (
        (limits.tokens_per_day, c.tokens_day + ask.tokens, "tokens per day", seconds_to_next_day, "tokens_per_day"),
        (
            limits.tokens_per_month,
            c.tokens_month + ask.tokens,
            "tokens per month",
            seconds_to_next_month,
            "tokens_per_month",
        ),
        (limits.usd_per_day, c.usd_day + ask.usd, "USD per day", seconds_to_next_day, "usd_per_day"),
        (limits.usd_per_month, c.usd_month + ask.usd, "USD per month", seconds_to_next_month, "usd_per_month"),
    )
    for cap, would_be, what, until, name in caps:
        if cap and would_be > cap + EPSILON:
            refusals.append(_refuse(what, cap, until(now), scope, name))
    if refusals:
        raise max(refusals, key=lambda e: e.retry_after or 0.0)
    held = dict(c.held)
    held[ask.job_id] = [ask.tokens, ask.usd, ask.expires, rpm_add, tpm_per, c.day]
    return replace(
        c,
        held=held,
        rpm_tat=max(c.rpm_tat, now) + rpm_add if rpm_add else c.rpm_tat,
        tpm_tat=max(c.tpm_tat, now) + ask.tokens * tpm_per if tpm_per else c.tpm_tat,
        tokens_day=c.tokens_day + ask.tokens,
        usd_day=c.usd_day + ask.usd,
        tokens_month=c.tokens_month + ask.tokens,
        usd_month=c.usd_month + ask.usd,
    )


def settle(c: Counters, job_id: str, tokens: int, usd: float, now: float) -> Counters:
    """Replace job_id's reservation by what it actually used; unchanged if it is not held
    (settled already, or expired: its reservation stays charged)."""
    c = roll(c, now)
    h = c.held.get(job_id)
    if h is None:
        return c
    r_tokens, r_usd, _, _, tpm_per, day = h
    held = dict(c.held)
    del held[job_id]
    d_tokens, d_usd = tokens - int(r_tokens), usd - float(r_usd)
    changes: dict[str, Any] = {"held": held}
    if tpm_per:
        changes["tpm_tat"] = c.tpm_tat + d_tokens * float(tpm_per)
    if day == c.day:
        changes.update(tokens_day=max(0, c.tokens_day + d_tokens), usd_day=max(0.0, c.usd_day + d_usd))
    if _month_of_day(int(day)) == c.month:
        changes.update(tokens_month=max(0, c.tokens_month + d_tokens), usd_month=max(0.0, c.usd_month + d_usd))
    return replace(c, **changes)


def release(c: Counters, job_id: str, now: float) -> Counters:
    """Undo an admission that never reached a queue (another limit refused it, the enqueue
    failed): everything it took is given back, its request too."""
    c = roll(c, now)
    h = c.held.get(job_id)
    if h is None:
        return c
    c = settle(c, job_id, 0, 0.0, now)
    rpm_add = float(h[3])
    return replace(c, rpm_tat=c.rpm_tat - rpm_add) if rpm_add else c
