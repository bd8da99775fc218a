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
from collections.abc import Callable

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from scheduler import limits as L
from schemas import subjects
from schemas.errors import RateLimitError, TokenyardError
from schemas.tenancy import Limits

log = structlog.get_logger(__name__)

MAX_CAS_ATTEMPTS = 64
ENTRY_TTL = 40 * 86400.0  # an entry untouched this long is gone; a month cap needs <= 31 days
CACHE_SIZE = 50_000
WATCH_OPEN_WAIT = 5.0  # seconds `start()` waits for the watch to open
WATCH_CHECK = 5.0  # seconds between checks that the watch's consumer is still there
WATCH_BACKOFF = (0.2, 5.0)  # first and longest pause before a failed watch is opened again
MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+: an entry removed by the server (TTL)


class ContentionError(TokenyardError):
    """A counter kept changing under us; the request is refused as a retryable 503."""

    status = 503


async def open_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    config = KeyValueConfig(
        bucket=subjects.LIMITS_BUCKET, history=1, ttl=ENTRY_TTL, storage=StorageType.FILE, replicas=replicas
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:  # exists with other settings: use it as it is
        return await js.key_value(subjects.LIMITS_BUCKET)


Change = Callable[[L.Counters], L.Counters]


class Quota:
    def __init__(self, kv: KeyValue, *, watch_check: float = WATCH_CHECK) -> None:
        self._kv = kv
        # key -> (value, revision); the watch stores the value as it came, decoded on first use
        self._cache: OrderedDict[str, tuple[L.Counters | bytes, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self.known: set[str] = set()  # entries that exist: settle them even without a reservation hint
        self._watch_check = watch_check
        self._watch: asyncio.Task[None] | None = None
        self._watched = 0  # the last bucket revision the watch delivered: a reopened watch resumes there

    async def start(self) -> None:
        """Keep the cache fresh with other schedulers' writes, from now until `stop()`. Waits
        for the watch to open (at most WATCH_OPEN_WAIT: admissions work without it)."""
        if self._watch is None:
            opened = asyncio.Event()
            self._watch = asyncio.create_task(self._follow(opened))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), WATCH_OPEN_WAIT)

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
            value = L.Counters.decode(value)
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
        return L.Counters.decode(entry.value or b""), entry.revision or 0

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
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                return await self._change(key, fn)
            finally:
                if not lock._waiters:  # type: ignore[attr-defined]  # keep the dict small
                    self._locks.pop(key, None)

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

    async def _follow(self, opened: asyncio.Event) -> None:
        """Watch the bucket for as long as the scheduler runs: reopened after any failure (a
        reconnect that lost the consumer, a server restart), after a pause that doubles up to
        WATCH_BACKOFF[1] and starts over once the watch is healthy again."""
        pause = WATCH_BACKOFF[0]
        while True:
            try:
                sub = await self._subscribe()
                opened.set()
                try:
                    while True:
                        await asyncio.sleep(self._watch_check)
                        await sub.consumer_info()  # fails once the consumer is gone for good
                        pause = WATCH_BACKOFF[0]
                finally:
                    with contextlib.suppress(nats.errors.Error):
                        await sub.unsubscribe()
            except Exception:  # top of a loop: meanwhile the cache only gets staler, the CAS stays exact
                log.warning("limits.watch_failed", retry_in=pause, exc_info=True)
                opened.set()  # do not hold up the start: admissions work without the watch
            await asyncio.sleep(pause)
            pause = min(WATCH_BACKOFF[1], pause * 2)

    async def _subscribe(self) -> JetStreamContext.PushSubscription:
        """An ordered consumer on the bucket's stream, from the next write on (or from just after
        the last one seen, when reopened). nats-py's `KeyValue.watch()` would first replay the
        latest value of every key and has no "updates only" option (2.16), so this subscribes
        to the stream itself, by the names the KeyValue was opened with."""
        kv = self._kv
        if self._watched:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._watched + 1)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        prefix = kv._pre

        async def on_update(msg: Msg) -> None:
            try:
                revision = msg.metadata.sequence.stream
                headers = msg.headers or {}
                gone = headers.get(KV_OP) in (KV_DEL, KV_PURGE) or MARKER_REASON in headers or not msg.data
                self.observe(msg.subject[len(prefix) :], None if gone else msg.data, revision)
                self._watched = max(self._watched, revision)
            except Exception:  # top of the watch's loop: one odd message must not end it
                log.exception("limits.watch_bad_update", subject=msg.subject)

        return await kv._js.subscribe(
            f"{prefix}>", stream=kv._stream, cb=on_update, ordered_consumer=True, config=config
        )


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

    results = await asyncio.gather(
        *(quota.change(key, reserve(key, lim, scope)) for key, lim, scope in subjects_), return_exceptions=True
    )
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
