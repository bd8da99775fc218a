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

With several schedulers the cache would mostly be stale (the last write came from another
one), so `start()` follows the bucket: every write any scheduler makes updates the cached
value here, usually before the next admission of that subject arrives. The watch is only an
optimisation: the CAS stays the judge, so a late or lost update costs one retry, never a
wrong count.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from scheduler import limits as L
from schemas import streams, subjects
from schemas.codec import WireError
from schemas.errors import ContentionError, RateLimitError
from schemas.jetstream import follow
from schemas.tenancy import Limits

log = structlog.get_logger(__name__)

MAX_CAS_ATTEMPTS = 64
CACHE_SIZE = 50_000
WATCH_OPEN_WAIT = 5.0  # seconds `start()` waits for the watch to open
WATCH_CHECK = 5.0  # seconds between checks that the watch's consumer is still there
WATCH_BACKOFF = (0.2, 5.0)  # first and longest pause before a failed watch is opened again
MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+: an entry removed by the server (TTL)


Change = Callable[[L.Counters], L.Counters]


@dataclass(slots=True)
class _KeyLock:
    """Serialises one entry's changes on this scheduler; dropped once nobody holds or awaits it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Quota:
    """The limit counters of `streams.LIMITS`; `js` follows the bucket's writes (`start`)."""

    def __init__(self, kv: KeyValue, js: JetStreamContext, *, watch_check: float = WATCH_CHECK) -> None:
        self._kv = kv
        self._js = js
        # key -> (value, revision); the watch stores the value as it came, decoded on first use
        self._cache: OrderedDict[str, tuple[L.Counters | bytes, int]] = OrderedDict()
        self._locks: dict[str, _KeyLock] = {}
        self.known: set[str] = set()  # entries that exist: settle them even without a reservation hint
        self._watch_check = watch_check
        self._watch: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        self._watched = 0  # the last bucket revision the watch delivered: a reopened watch resumes there

    async def start(self) -> None:
        """Keep the cache fresh with other schedulers' writes, from now until `stop()`. Waits
        for the watch to open (at most WATCH_OPEN_WAIT: admissions work without it)."""
        if self._watch is None:
            self._watch = asyncio.create_task(
                follow(self._updates, self._on_update, name="limits", backoff=WATCH_BACKOFF)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._opened.wait(), WATCH_OPEN_WAIT)

    async def stop(self) -> None:
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def cached(self, key: str) -> tuple[L.Counters, int] | None:
        """The value and revision this scheduler would try its next change of `key` on."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        value, rev = entry
        if isinstance(value, bytes):  # decoded on first use: most writes are superseded unused
            value = _counters(key, value)
            self._cache[key] = (value, rev)
        return value, rev

    def observe(self, key: str, value: bytes | None, revision: int) -> None:
        """One write seen on the watch (`None`: the entry was deleted). Updates arrive in bucket
        order, but a change of ours may have cached a newer revision already: keep the newest."""
        cached = self._cache.get(key)
        if cached is not None and cached[1] >= revision:
            return
        if value is None:
            self._cache.pop(key, None)
        else:
            self._remember(key, (value, revision))

    async def _load(self, key: str) -> tuple[L.Counters, int]:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return L.Counters(), 0
        self.known.add(key)
        return _counters(key, entry.value or b""), entry.revision or 0

    def _remember(self, key: str, value: tuple[L.Counters | bytes, int]) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _keep(self, key: str, seen: int, value: L.Counters, rev: int) -> None:
        """Cache what a change wrote or read, unless the watch brought a newer revision while it
        ran (`seen`: the revision cached when it began). A newer one that was there before is
        replaced: it can only be left from a bucket made anew, whose revisions started over."""
        now = self._cache.get(key)
        if now is not None and now[1] != seen and now[1] > rev:
            return
        self._remember(key, (value, rev))

    async def change(self, key: str, fn: Change) -> L.Counters:
        """Apply `fn` to the entry by compare-and-set; `fn` may raise to refuse."""
        held = self._locks.get(key)
        if held is None:
            held = self._locks[key] = _KeyLock()
        held.users += 1
        try:
            async with held.lock:
                return await self._change(key, fn)
        finally:
            held.users -= 1
            if not held.users:  # keep the dict small
                del self._locks[key]

    async def _change(self, key: str, fn: Change) -> L.Counters:
        cached = self.cached(key)
        fresh = cached is None
        current, rev = cached if cached is not None else await self._load(key)
        seen = cached[1] if cached is not None else 0
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
                self._keep(key, seen, current, rev)
                return current
            try:
                if rev:
                    rev = await self._kv.update(key, new.encode(), last=rev)
                else:
                    rev = await self._kv.create(key, new.encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                if attempt > 2:
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                watched = self.cached(key)
                if watched is not None and watched[1] > rev:  # the watch brought the write we lost to:
                    (current, rev), fresh = watched, False  # try on it, no read (a refusal still re-reads)
                else:
                    (current, rev), fresh = await self._load(key), True
                continue
            self.known.add(key)
            self._keep(key, seen, new, rev)
            return new
        self._cache.pop(key, None)
        raise ContentionError("The rate-limit counters are too contended right now. Try again.", retry_after=1.0)

    async def read(self, key: str) -> L.Counters:
        return (await self._load(key))[0]

    async def _updates(self) -> AsyncIterator[Msg]:
        """Every write to the bucket from the next one on (or from just after the last one seen,
        when reopened), through an ordered consumer on the bucket's stream. nats-py's
        `KeyValue.watch()` would first replay the latest value of every key and has no "updates
        only" option (2.16). Ends with an error once the consumer is gone for good (a server
        restart), so `follow` opens it again."""
        if self._watched:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._watched + 1)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        sub = await self._js.subscribe(
            f"{subjects.kv_prefix(streams.LIMITS.bucket)}>",
            stream=streams.LIMITS.stream.name,
            ordered_consumer=True,
            config=config,
        )
        self._opened.set()
        try:
            while True:
                try:
                    yield await sub.next_msg(timeout=self._watch_check)
                except nats.errors.TimeoutError:
                    await sub.consumer_info()  # raises once the consumer is gone
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def _on_update(self, msg: Msg) -> None:
        revision = msg.metadata.sequence.stream
        headers = msg.headers or {}
        gone = headers.get(KV_OP) in (KV_DEL, KV_PURGE) or MARKER_REASON in headers or not msg.data
        self.observe(
            msg.subject[len(subjects.kv_prefix(streams.LIMITS.bucket)) :], None if gone else msg.data, revision
        )
        self._watched = max(self._watched, revision)


def _counters(key: str, data: bytes) -> L.Counters:
    """An entry's counters. One that cannot be read (written by an incompatible version) starts
    over, loudly: refusing every request of that key or org forever would be worse."""
    if not data:
        return L.Counters()
    try:
        return L.Counters.decode(data)
    except WireError as e:
        log.error("limits.unreadable_entry_reset", key=key, error=str(e))
        return L.Counters()


_ENFORCED = ("rpm", "tpm", "max_concurrent", "tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month")


def limited(limits: Limits) -> bool:
    """Does any counter-backed limit apply? (max_tokens and max_body_bytes are checked per request.)"""
    return any(getattr(limits, name) for name in _ENFORCED)


def entries(key_id: str, org: str, key_limits: Limits, org_limits: Limits) -> list[tuple[str, Limits, str]]:
    """(KV key, limits, scope shown in errors) of each subject with a limit."""
    out = []
    if key_id and limited(key_limits):
        out.append((subjects.limits_entry("k", key_id), key_limits, "this API key"))
    if org and limited(org_limits):
        out.append((subjects.limits_entry("o", org), org_limits, "this organization"))
    return out


@dataclass(frozen=True, slots=True)
class Admitted:
    """What `admit` reserved: the entries where it made a new reservation (none for a retried
    submission: those were reserved before) and the completion grant every subject allows (the
    smallest of theirs; None: unbounded)."""

    entries: list[str]
    completion_tokens: int | None


async def admit(quota: Quota, subjects_: list[tuple[str, Limits, str]], ask: L.Ask, now: float) -> Admitted:
    """Reserve `ask` on every subject at once (one CAS each, concurrently); if any refuses,
    give back what the others took and raise. A subject whose grant is larger than another's
    keeps its larger reservation until settlement: the safe side of its budgets."""
    created: dict[str, bool] = {}  # decided by the last (the written) evaluation of each entry

    def reserve(key: str, lim: Limits, scope: str) -> Change:
        def fn(c: L.Counters) -> L.Counters:
            created[key] = ask.job_id not in L.roll(c, now).held
            return L.reserve(c, lim, ask, now, scope=scope)

        return fn

    results = await asyncio.gather(
        *(quota.change(key, reserve(key, lim, scope)) for key, lim, scope in subjects_), return_exceptions=True
    )
    new = [key for (key, _, _), r in zip(subjects_, results) if not isinstance(r, BaseException) and created.get(key)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        grants = [g for r in results if isinstance(r, L.Counters) and (g := L.granted(r, ask.job_id)) is not None]
        return Admitted(new, min(grants) if grants else None)
    await release(quota, new, ask.job_id, now)
    raise failures[0]


async def release(quota: Quota, keys: list[str], job_id: str, now: float) -> None:
    for key in keys:
        try:
            await quota.change(key, lambda c: L.release(c, job_id, now))
        except Exception:  # the reservation expires on its own; never fail the caller for it
            log.exception("limits.release_failed", key=key)
