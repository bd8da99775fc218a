"""Admission limits as pure functions over one subject's counters (a key or an org).

One `Counters` value is one KV entry (bucket `ty_limits`), changed only by compare-and-set,
so every scheduler decides on the same, latest state and a limit holds across replicas.
Everything a subject needs lives in that one entry, so a limited request costs one CAS per
subject:

- rpm and tpm are sliding windows of one-second buckets (`Window`: the non-empty buckets of
  the last minute, at most 61). A request costing `c` under a limit of `N` per minute is
  admitted iff the buckets from `now - 60 s` on hold at most `N - c`. The bucket `now - 60 s`
  falls in is counted whole, so every admission of the last 60 s is counted and no 60 s window
  ever holds more than `N`; the price is refusing at most one bucket's worth too early. A full
  burst of `N` is admitted at once on an empty window.
- token and money caps per UTC day and month are plain counters, reset when the period turns.
- `held` maps each admitted, unsettled job id to what it reserved. Its length is the
  concurrency in use; a job id already held makes admission a no-op (a retried submission or
  a re-dispatch reserves once); settling replaces the reservation by the actual numbers.
  A reservation nobody settles (its gateway died) expires at `expires` and frees its slot;
  its tokens and money stay charged as reserved, the safe side of a budget.

A hard cap must hold even for a request that names no `max_tokens`: admission reserves the
prompt plus a completion *grant*: the request's own bound (its max_tokens, the route's context,
the key's default: `completion_bound`), lowered to what the subject's token and money budgets
have left (`Ask`, `reserve`). The scheduler caps the job's generation at the grant
(`cap_completion`), so the worker stops there and the budget cannot be overrun.

Time is passed in; nothing here does I/O.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from schemas.codec import WireError, pack, unpack
from schemas.errors import RateLimitError
from schemas.tenancy import Limits

WINDOW = 60.0  # seconds: rpm and tpm are per rolling minute
GRANULE = 1.0  # seconds per window bucket
SPAN = round(WINDOW / GRANULE)  # buckets before the current one that are still in the window
CONCURRENCY_RETRY_AFTER = 1.0
EPSILON = 1e-12  # USD: float rounding only (a cap of $0.0001 is a real cap)
NO_BUCKET = -1

# held[job_id] = [tokens, usd, expires, rpm_bucket, tpm_bucket, day, grant]
# (a bucket NO_BUCKET when that window was not counted; grant -1 when the completion was not bounded)
Held = list[Any]

# A sliding window: (bucket, amount) of its non-empty buckets, oldest first.
Window = tuple[tuple[int, int], ...]


def bucket_of(now: float) -> int:
    return math.floor(now / GRANULE)


def window_live(w: Window, now: float) -> Window:
    """The buckets still in the window at `now` (from the one `now - WINDOW` falls in on)."""
    first = bucket_of(now) - SPAN
    if not w or w[0][0] >= first:
        return w
    return tuple(p for p in w if p[0] >= first)


def window_used(w: Window, now: float) -> int:
    return sum(a for _, a in window_live(w, now))


def window_wait(w: Window, cost: int, limit: int, now: float) -> float:
    """Seconds until `cost` more fits under `limit` (0: it fits now; inf: it never will)."""
    live = window_live(w, now)
    excess = sum(a for _, a in live) + cost - limit
    if excess <= 0:
        return 0.0
    for b, a in live:  # oldest first: each bucket leaves the window once `now` is SPAN+1 buckets on
        excess -= a
        if excess <= 0:
            return max(0.0, (b + SPAN + 1) * GRANULE - now)
    return math.inf


def window_add(w: Window, amount: int, now: float) -> tuple[Window, int]:
    """The window with `amount` counted now, and the bucket it went into. A bucket newer than
    now (written by a scheduler whose clock is ahead) takes it instead: later is the safe side."""
    live = window_live(w, now)
    b = bucket_of(now)
    if live and live[-1][0] >= b:
        last, total = live[-1]
        return live[:-1] + ((last, total + amount),), last
    return live + ((b, amount),), b


def window_adjust(w: Window, bucket: int, delta: int, now: float) -> Window:
    """Change what `bucket` holds by `delta` (never below zero); nothing if it left the window."""
    live = window_live(w, now)
    out = []
    for b, a in live:
        if b == bucket:
            a = max(0, a + delta)
        if a:
            out.append((b, a))
    return tuple(out)


def _flat(w: Window) -> list[int]:
    return [x for pair in w for x in pair]


def _window(value: Any) -> Window:
    flat = [int(x) for x in (value or ())]
    if len(flat) % 2:
        raise ValueError("a window needs (bucket, amount) pairs")
    return tuple(sorted((flat[i], flat[i + 1]) for i in range(0, len(flat), 2)))


@dataclass(frozen=True, slots=True)
class Counters:
    rpm: Window = ()
    tpm: Window = ()
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
                "rpmw": _flat(self.rpm),
                "tpmw": _flat(self.tpm),
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
        """An entry's counters; a WireError for bytes that are not (the caller decides). An
        entry from before the windows (GCRA times under "rpm"/"tpm") starts with empty windows."""
        o = unpack(data)
        try:
            return cls(
                _window(o.get("rpmw")),
                _window(o.get("tpmw")),
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
    """What one admission asks for."""

    job_id: str
    prompt_tokens: int  # the prompt estimate
    expires: float  # unix time the reservation lapses if never settled
    completion_tokens: int | None = None  # the most it may generate (`completion_bound`); None: unbounded
    input_price: float = 0.0  # USD per prompt token on the chosen route
    output_price: float = 0.0  # USD per completion token

    def usd(self, completion: int) -> float:
        return self.prompt_tokens * self.input_price + completion * self.output_price


def completion_bound(asked: int | None, context_length: int, prompt_tokens: int, *defaults: int) -> int | None:
    """The most completion tokens a request may use before any budget is looked at: what it
    asked for, the room its route's context leaves after the prompt, and each default budget
    (a key's or an org's max_tokens), whichever is smallest; None when nothing bounds it."""
    bounds = [b for b in (asked, *defaults) if b]
    if context_length > 0:
        bounds.append(max(1, context_length - prompt_tokens))
    return min(bounds) if bounds else None


def _room(c: Counters, limits: Limits, ask: Ask) -> int | None:
    """The most completion tokens the subject's caps let this request have after its prompt
    (None: no token or money cap bounds it). tpm counts as the whole minute's allowance: the
    window must then have room for all of it (`reserve`), rather than hand out a sliver."""
    rooms = []
    if limits.tpm:
        rooms.append(limits.tpm - ask.prompt_tokens)
    for cap, used in ((limits.tokens_per_day, c.tokens_day), (limits.tokens_per_month, c.tokens_month)):
        if cap:
            rooms.append(cap - used - ask.prompt_tokens)
    if ask.output_price > 0:
        for usd_cap, spent in ((limits.usd_per_day, c.usd_day), (limits.usd_per_month, c.usd_month)):
            if usd_cap:
                rooms.append(math.floor((usd_cap - spent - ask.usd(0) + EPSILON) / ask.output_price))
    return min(rooms) if rooms else None


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

    It reserves the prompt and a completion grant: `ask.completion_tokens` lowered to what the
    caps leave (`granted` reads it back). It is refused when not even its smallest form fits
    (the prompt and one completion token, or none if it asks for none), or when a window has no
    room for all it reserves. Idempotent: a job id already held returns the counters unchanged.
    """
    c = roll(c, now)
    if ask.job_id in c.held:
        return c
    bound, room = ask.completion_tokens, _room(c, limits, ask)
    least = 0 if bound == 0 else 1
    grant = bound if room is None else room if bound is None else min(bound, room)
    completion = max(least, grant) if grant is not None else 0
    tokens, usd = ask.prompt_tokens + completion, ask.usd(completion)
    refusals: list[RateLimitError] = []
    if limits.max_concurrent and c.in_flight >= limits.max_concurrent:
        refusals.append(
            _refuse("requests in flight", limits.max_concurrent, CONCURRENCY_RETRY_AFTER, scope, "max_concurrent")
        )
    if limits.rpm:
        wait = window_wait(c.rpm, 1, limits.rpm, now)
        if wait > 0:
            refusals.append(_refuse("requests per minute", limits.rpm, wait, scope, "rpm"))
    if limits.tpm:
        if ask.prompt_tokens + least > limits.tpm:
            refusals.append(
                RateLimitError(
                    f"Request too large for {scope}: {ask.prompt_tokens + least} tokens asked, limit {limits.tpm} "
                    "tokens per minute. Lower max_tokens or the prompt.",
                    param="tpm",
                    code="rate_limit_exceeded",
                    retry_after=WINDOW,
                )
            )
        else:
            wait = window_wait(c.tpm, tokens, limits.tpm, now)
            if wait > 0:
                refusals.append(_refuse("tokens per minute", limits.tpm, wait, scope, "tpm"))
    smallest_tokens, smallest_usd = ask.prompt_tokens + least, ask.usd(least)
    caps = (
        (
            limits.tokens_per_day,
            c.tokens_day + smallest_tokens,
            "tokens per day",
            seconds_to_next_day,
            "tokens_per_day",
        ),
        (
            limits.tokens_per_month,
            c.tokens_month + smallest_tokens,
            "tokens per month",
            seconds_to_next_month,
            "tokens_per_month",
        ),
        (limits.usd_per_day, c.usd_day + smallest_usd, "USD per day", seconds_to_next_day, "usd_per_day"),
        (limits.usd_per_month, c.usd_month + smallest_usd, "USD per month", seconds_to_next_month, "usd_per_month"),
    )
    for cap, would_be, what, until, name in caps:
        if cap and would_be > cap + EPSILON:
            refusals.append(_refuse(what, cap, until(now), scope, name))
    if refusals:
        raise max(refusals, key=lambda e: e.retry_after or 0.0)
    rpm, rpm_bucket = window_add(c.rpm, 1, now) if limits.rpm else (c.rpm, NO_BUCKET)
    tpm, tpm_bucket = window_add(c.tpm, tokens, now) if limits.tpm else (c.tpm, NO_BUCKET)
    held = dict(c.held)
    held[ask.job_id] = [tokens, usd, ask.expires, rpm_bucket, tpm_bucket, c.day, -1 if grant is None else completion]
    return replace(
        c,
        held=held,
        rpm=rpm,
        tpm=tpm,
        tokens_day=c.tokens_day + tokens,
        usd_day=c.usd_day + usd,
        tokens_month=c.tokens_month + tokens,
        usd_month=c.usd_month + usd,
    )


def granted(c: Counters, job_id: str) -> int | None:
    """The completion grant of `job_id`'s reservation (None: unbounded, or not held here)."""
    h = c.held.get(job_id)
    if h is None or len(h) < 7 or int(h[6]) < 0:
        return None
    return int(h[6])


def cap_completion(request: Mapping[str, Any], grant: int) -> dict[str, Any]:
    """The request with its completion limited to `grant` tokens: each of `max_tokens` and
    `max_completion_tokens` it names that asks for more is lowered (one naming neither gets
    `max_completion_tokens`)."""
    out = dict(request)
    named = [f for f in ("max_completion_tokens", "max_tokens") if out.get(f) is not None] or ["max_completion_tokens"]
    for name in named:
        asked = out.get(name)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked > grant:
            out[name] = grant
    return out


def settle(c: Counters, job_id: str, tokens: int, usd: float, now: float) -> Counters:
    """Replace job_id's reservation by what it actually used; unchanged if it is not held
    (settled already, or expired: its reservation stays charged). The tpm bucket it was counted
    in holds the actual tokens from now on (if it is still in the window)."""
    c = roll(c, now)
    h = c.held.get(job_id)
    if h is None:
        return c
    r_tokens, r_usd, _, _, tpm_bucket, day = h[:6]
    held = dict(c.held)
    del held[job_id]
    d_tokens, d_usd = tokens - int(r_tokens), usd - float(r_usd)
    changes: dict[str, Any] = {"held": held}
    if _is_bucket(tpm_bucket) and d_tokens:
        changes["tpm"] = window_adjust(c.tpm, int(tpm_bucket), d_tokens, now)
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
    rpm_bucket = h[3]
    return replace(c, rpm=window_adjust(c.rpm, int(rpm_bucket), -1, now)) if _is_bucket(rpm_bucket) else c


def _is_bucket(value: Any) -> bool:
    """A bucket index of this version's holds (an older hold kept GCRA seconds there, a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value != NO_BUCKET
