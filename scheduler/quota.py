"""Limit counters in NATS KV, changed only by compare-and-set: exact across schedulers.

`Quota` owns every KV call of the scheduler. Each subject (an API key, an org) is one entry
of `scheduler.limits.Counters`. A change reads the entry, applies a pure function of
`scheduler.limits` and writes it back with `update(last=revision)`; if another scheduler
wrote in between, the write fails and the change is redone on the fresh value. So every
decision is made on the latest state: N schedulers enforce one limit, not N of it.

Round trips: the last value and revision each scheduler wrote or read are kept, so the common
case (the same scheduler saw the latest write) is one KV write per subject. Changes to one
entry from one scheduler are serialised by a lock, so they never conflict with each other;
only writes from other schedulers cause a retry. A refusal or a no-op decided on a cached
value is checked again on a fresh read, so a stale cache can never refuse a request nor skip
a settlement (a reservation another scheduler made is not in our cached copy).
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Callable

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.errors import RateLimitError, TokenyardError
from schemas.tenancy import Limits
from scheduler import limits as L

log = structlog.get_logger(__name__)

MAX_CAS_ATTEMPTS = 64
ENTRY_TTL = 40 * 86400.0  # an entry untouched this long is gone; a month cap needs <= 31 days
CACHE_SIZE = 50_000


class ContentionError(TokenyardError):
    """A counter kept changing under us; the request is refused as a retryable 503."""

    status = 503


async def open_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    config = KeyValueConfig(bucket=subjects.LIMITS_BUCKET, history=1, ttl=ENTRY_TTL,
                            storage=StorageType.FILE, replicas=replicas)
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:  # exists with other settings: use it as it is
        return await js.key_value(subjects.LIMITS_BUCKET)


Change = Callable[[L.Counters], L.Counters]


class Quota:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._cache: OrderedDict[str, tuple[L.Counters, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self.known: set[str] = set()  # entries that exist: settle them even without a reservation hint

    async def _load(self, key: str) -> tuple[L.Counters, int]:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return L.Counters(), 0
        self.known.add(key)
        return L.Counters.decode(entry.value or b""), entry.revision or 0

    def _remember(self, key: str, value: tuple[L.Counters, int]) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def change(self, key: str, fn: Change) -> L.Counters:
        """Apply `fn` to the entry by compare-and-set; `fn` may raise to refuse."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                return await self._change(key, fn)
            finally:
                if not lock._waiters:  # type: ignore[attr-defined]  # keep the dict small
                    self._locks.pop(key, None)

    async def _change(self, key: str, fn: Change) -> L.Counters:
        cached = self._cache.get(key)
        fresh = cached is None
        current, rev = cached if cached is not None else await self._load(key)
        for attempt in range(MAX_CAS_ATTEMPTS):
            try:
                new = fn(current)
            except RateLimitError:
                if fresh:
                    raise
                current, rev = await self._load(key)  # refuse only on the latest state
                fresh = True
                continue
            if new is current:
                if not fresh:  # "nothing to do" on a cached value may be stale (another scheduler
                    current, rev = await self._load(key)  # reserved what we would settle): re-read
                    fresh = True
                    continue
                self._remember(key, (current, rev))
                return current
            try:
                if rev:
                    rev = await self._kv.update(key, new.encode(), last=rev)
                else:
                    rev = await self._kv.create(key, new.encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                if attempt > 2:
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                current, rev = await self._load(key)
                fresh = True
                continue
            self.known.add(key)
            self._remember(key, (new, rev))
            return new
        self._cache.pop(key, None)
        raise ContentionError("The rate-limit counters are too contended right now. Try again.", retry_after=1.0)

    async def read(self, key: str) -> L.Counters:
        return (await self._load(key))[0]


_ENFORCED = ("rpm", "tpm", "max_concurrent", "tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month")


def limited(limits: Limits) -> bool:
    """Does any counter-backed limit apply? (`Limits.empty` deep-copies; this is the hot path.)"""
    return any(getattr(limits, name) for name in _ENFORCED)


def entries(key_id: str, org: str, key_limits: Limits, org_limits: Limits) -> list[tuple[str, Limits, str]]:
    """(KV key, limits, scope shown in errors) of each subject with a limit."""
    out = []
    if key_id and limited(key_limits):
        out.append((subjects.limits_entry("k", key_id), key_limits, "this API key"))
    if org and limited(org_limits):
        out.append((subjects.limits_entry("o", org), org_limits, "this organization"))
    return out


async def admit(quota: Quota, subjects_: list[tuple[str, Limits, str]], ask: L.Ask, now: float) -> list[str]:
    """Reserve `ask` on every subject at once (one CAS each, concurrently); if any refuses,
    give back what the others took and raise. Returns the entries where this call made a new
    reservation (empty for a retried submission: those were reserved before)."""
    created: dict[str, bool] = {}  # decided by the last (the written) evaluation of each entry

    def reserve(key: str, lim: Limits, scope: str) -> Change:
        def fn(c: L.Counters) -> L.Counters:
            created[key] = ask.job_id not in L.roll(c, now).held
            return L.reserve(c, lim, ask, now, scope=scope)
        return fn

    results = await asyncio.gather(*(quota.change(key, reserve(key, lim, scope)) for key, lim, scope in subjects_),
                                   return_exceptions=True)
    new = [key for (key, _, _), r in zip(subjects_, results) if not isinstance(r, BaseException) and created.get(key)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        return new
    await release(quota, new, ask.job_id, now)
    raise failures[0]


async def release(quota: Quota, keys: list[str], job_id: str, now: float) -> None:
    for key in keys:
        try:
            await quota.change(key, lambda c: L.release(c, job_id, now))
        except Exception:  # the reservation expires on its own; never fail the caller for it
            log.exception("limits.release_failed", key=key)
