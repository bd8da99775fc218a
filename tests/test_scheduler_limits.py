"""Limits: the pure counters (GCRA, caps, reservations), and exactness across two schedulers
and two submitting connections on one real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from scheduler import limits as L
from scheduler.quota import Quota
from schemas import streams, subjects
from schemas.codec import WireError
from schemas.errors import RateLimitError, from_wire
from schemas.jetstream import open_bucket
from schemas.jobs import Admission, Job, ModelAdvert, NodeAdvert, Submission
from schemas.tenancy import Limits
from schemas.usage import UsageRecord
from tests.stack import Stack

MODEL = "lim/model"
T0 = 1_700_000_000.0  # a fixed clock for the pure tests


# --- helpers shared by the scheduler tests ---------------------------------------------------


class FakeNodes:
    """Publishes NodeAdverts for simulated nodes and answers roll calls, like real workers."""

    def __init__(self, nc: NATS, adverts: list[NodeAdvert]) -> None:
        self.nc = nc
        self.adverts = {a.node: a for a in adverts}
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> None:
        for a in self.adverts.values():
            await self.nc.publish(subjects.fleet_heartbeat(a.node), a.encode())
        await self.nc.flush()

    async def start(self) -> FakeNodes:
        async def on_roll_call(_: Any) -> None:
            await self.publish()

        await self.nc.subscribe(subjects.FLEET_ROLL_CALL, cb=on_roll_call)
        await self.publish()

        async def forever() -> None:
            while True:
                await asyncio.sleep(0.2)
                await self.publish()

        self._task = asyncio.create_task(forever())
        return self

    def set(self, advert: NodeAdvert) -> None:
        self.adverts[advert.node] = advert

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()


def node(
    name: str,
    pool: str = "own",
    *,
    model: str = MODEL,
    slots: int = 4,
    free: int | None = None,
    kind: str = "own",
    healthy: bool = True,
    price: tuple[float, float] = (0.0, 0.0),
) -> NodeAdvert:
    return NodeAdvert(
        node=name,
        pool=pool,
        models=(ModelAdvert(model, 4096, "t", *price),),
        slots_total=slots,
        slots_free=slots if free is None else free,
        interval=0.2,
        kind=kind,
        healthy=healthy,
    )


def job(
    job_id: str, *, model: str = MODEL, deadline: float = 60.0, dispatch: int = 1, request: dict[str, Any] | None = None
) -> Job:
    return Job(
        id=job_id,
        model=model,
        request=request or {"model": model, "messages": []},
        reply=f"ty.reply.test.{job_id}",
        deadline=time.time() + deadline,
        dispatch=dispatch,
    )


async def submit(nc: NATS, sub: Submission, timeout: float = 10.0) -> Admission:
    return Admission.decode((await nc.request(subjects.SCHED_SUBMIT, sub.encode(), timeout=timeout)).data)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(every)
    return False


async def read_counters(nc: NATS, scope: str, ident: str) -> L.Counters:
    kv = await nc.jetstream().key_value(subjects.LIMITS_BUCKET)
    return L.Counters.decode((await kv.get(subjects.limits_entry(scope, ident))).value or L.Counters().encode())


async def publish_usage(
    nc: NATS,
    job_id: str,
    *,
    key: str = "",
    org: str = "",
    tokens: tuple[int, int] = (0, 0),
    reserved: int = 0,
    outcome: str = "ok",
    route: str = "own",
    status: int = 200,
    cost: float = 0.0,
    ttft_ms: float = 0.0,
    duration_ms: float = 0.0,
) -> None:
    record = UsageRecord(
        job_id=job_id,
        time=time.time(),
        org=org,
        project="",
        key_id=key,
        model=MODEL,
        route=route,
        node="n",
        attempts=1,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        cached_tokens=0,
        cost=cost,
        ttft_ms=ttft_ms,
        duration_ms=duration_ms,
        outcome=outcome,
        status=status,
        reserved_tokens=reserved,
    )
    await nc.jetstream().publish(subjects.usage_subject(job_id), record.encode(), headers={"Nats-Msg-Id": job_id})


@pytest.fixture
async def two_schedulers(tmp_path: Path) -> AsyncIterator[tuple[Stack, FakeNodes, NATS, NATS]]:
    """nats-server, one fake node serving MODEL, two schedulers and two client connections."""
    stack = Stack(tmp_path)
    stack.start_nats()
    a = await stack.connect()
    b = await stack.connect()
    nodes = await FakeNodes(a, [node("n1", slots=1000)]).start()
    stack.start_scheduler(TOKENYARD_RESERVATION_MARGIN="0")
    stack.start_scheduler(TOKENYARD_RESERVATION_MARGIN="0")
    try:
        await stack.wait_for_scheduler()
        assert await eventually(lambda: _both_ready(a), 15)
        yield stack, nodes, a, b
    finally:
        await nodes.stop()
        await a.close()
        await b.close()
        await stack.close()


async def _both_ready(nc: NATS) -> bool:
    """Both schedulers answer and know the node (roll call answered)."""
    answers = set()
    for _ in range(8):
        r = await submit(nc, Submission(job=job(f"ready-{time.monotonic_ns()}")))
        answers.add(r.error is None)
    return answers == {True}


# --- pure -----------------------------------------------------------------------------------


def ask(job_id: str, tokens: int = 10, usd: float = 0.0, expires: float = T0 + 600) -> L.Ask:
    return L.Ask(job_id, tokens, usd, expires)


def test_rpm_admits_exactly_the_limit_in_a_burst_then_one_per_interval() -> None:
    c, lim = L.Counters(), Limits(rpm=10)
    for i in range(10):
        c = L.reserve(c, lim, ask(f"j{i}"), T0)
    with pytest.raises(RateLimitError) as e:
        L.reserve(c, lim, ask("j10"), T0)
    assert e.value.retry_after == pytest.approx(6.0)
    c = L.reserve(c, lim, ask("j10"), T0 + 6.0)  # one more every 60/rpm seconds
    with pytest.raises(RateLimitError):
        L.reserve(c, lim, ask("j11"), T0 + 6.5)


def test_tpm_reserves_the_estimate_and_settle_refunds_the_rest() -> None:
    c, lim = L.Counters(), Limits(tpm=1000)
    c = L.reserve(c, lim, ask("a", 600), T0)
    with pytest.raises(RateLimitError):
        L.reserve(c, lim, ask("b", 600), T0)
    c = L.settle(c, "a", 100, 0.0, T0 + 1)  # it used only 100 of 600
    c = L.reserve(c, lim, ask("b", 600), T0 + 1)
    with pytest.raises(RateLimitError) as e:
        L.reserve(c, lim, ask("c", 2000), T0 + 1)
    assert "too large" in e.value.message


def test_concurrency_is_the_number_of_unsettled_reservations() -> None:
    c, lim = L.Counters(), Limits(max_concurrent=2)
    c = L.reserve(L.reserve(c, lim, ask("a"), T0), lim, ask("b"), T0)
    with pytest.raises(RateLimitError):
        L.reserve(c, lim, ask("c"), T0)
    c = L.settle(c, "a", 5, 0.0, T0)
    c = L.reserve(c, lim, ask("c"), T0)
    assert c.in_flight == 2


def test_a_retried_reservation_is_a_no_op() -> None:
    c, lim = L.Counters(), Limits(rpm=1, max_concurrent=1, tokens_per_day=100)
    once = L.reserve(c, lim, ask("a", 50), T0)
    assert L.reserve(once, lim, ask("a", 50), T0) is once
    assert once.tokens_day == 50


def test_unsettled_reservations_expire_but_stay_charged() -> None:
    c, lim = L.Counters(), Limits(max_concurrent=1, tokens_per_day=100)
    c = L.reserve(c, lim, ask("a", 60, expires=T0 + 10), T0)
    with pytest.raises(RateLimitError):
        L.reserve(c, lim, ask("b", 10), T0 + 5)
    c = L.reserve(c, lim, ask("b", 10), T0 + 11)  # a's slot lapsed ...
    assert c.tokens_day == 70  # ... its tokens did not
    assert L.settle(c, "a", 0, 0.0, T0 + 12).tokens_day == 70  # a late settlement changes nothing


def test_day_and_money_caps_refuse_until_the_period_turns() -> None:
    c, lim = L.Counters(), Limits(tokens_per_day=100, usd_per_month=1.0)
    c = L.reserve(c, lim, ask("a", 90, usd=0.5), T0)
    with pytest.raises(RateLimitError) as e:
        L.reserve(c, lim, ask("b", 20), T0)
    assert e.value.code == "insufficient_quota"
    assert e.value.retry_after == pytest.approx(L.seconds_to_next_day(T0))
    c = L.settle(c, "a", 90, 0.6, T0)
    with pytest.raises(RateLimitError):
        L.reserve(c, lim, ask("b", 1, usd=0.5), T0)  # the month's money is the limit now
    tomorrow = (L.day_of(T0) + 1) * 86400.0 + 1
    c = L.reserve(c, lim, ask("b", 90, usd=0.1), tomorrow)
    assert c.tokens_day == 90


def test_release_gives_everything_back() -> None:
    c, lim = L.Counters(), Limits(rpm=1, tpm=100, tokens_per_day=100)
    taken = L.reserve(c, lim, ask("a", 100), T0)
    back = L.release(taken, "a", T0)
    assert back.in_flight == 0 and back.tokens_day == 0
    L.reserve(back, lim, ask("b", 100), T0)  # fits again


def test_counters_round_trip_and_refuse_garbage_loudly() -> None:
    c = L.reserve(L.Counters(), Limits(rpm=5, tpm=50), ask("a", 7, usd=0.25), T0)
    assert L.Counters.decode(c.encode()) == c
    with pytest.raises(WireError):  # never silently empty counters: that would reset spend caps
        L.Counters.decode(b"\x93\x01\x02\x03")


# --- real nats-server, two schedulers, two submitters ----------------------------------------


async def test_rpm_is_exact_across_two_schedulers_and_two_gateways(two_schedulers: Any) -> None:
    _, _, a, b = two_schedulers
    limits = Limits(rpm=10)
    subs = [
        Submission(job=job(f"rpm-{i}"), tenant="org1", key_id="key1", key_limits=limits, estimated_tokens=5)
        for i in range(40)
    ]
    answers = await asyncio.gather(*(submit(a if i % 2 else b, s) for i, s in enumerate(subs)))
    admitted = [x for x in answers if x.error is None]
    refused = [from_wire(x.error) for x in answers if x.error is not None]
    assert len(admitted) == 10
    assert all(isinstance(e, RateLimitError) and e.retry_after and e.retry_after >= 1 for e in refused)
    c = await read_counters(a, "k", "key1")
    assert c.in_flight == 10


async def test_org_limit_spans_keys_and_a_retry_reserves_once(two_schedulers: Any) -> None:
    _, _, a, b = two_schedulers
    org = Limits(max_concurrent=3)
    subs = [
        Submission(
            job=job(f"org-{i}"),
            tenant="org2",
            key_id=f"key-{i % 4}",
            org_limits=org,
            key_limits=Limits(rpm=1000),
            estimated_tokens=5,
        )
        for i in range(12)
    ]
    answers = await asyncio.gather(*(submit(a if i % 2 else b, s) for i, s in enumerate(subs)))
    ok = [s for s, x in zip(subs, answers) if x.error is None]
    assert len(ok) == 3
    again = await asyncio.gather(*(submit(b, s) for s in ok), *(submit(a, s) for s in ok))
    assert all(x.error is None for x in again)  # the same job asked again: admitted, not reserved twice
    assert (await read_counters(a, "o", "org2")).in_flight == 3
    # keys refused by the org gave back what they took
    held = sum([(await read_counters(a, "k", f"key-{i}")).in_flight for i in range(4)])
    assert held == 3


async def test_usage_records_settle_reservations_once(two_schedulers: Any) -> None:
    _, _, a, b = two_schedulers
    lim = Limits(max_concurrent=2, tokens_per_day=10_000, tpm=5000)
    subs = [
        Submission(job=job(f"set-{i}"), tenant="org3", key_id="key3", key_limits=lim, estimated_tokens=1000)
        for i in range(3)
    ]
    answers = [await submit(a, s) for s in subs]
    assert [x.error is None for x in answers] == [True, True, False]
    await publish_usage(a, "set-0", key="key3", org="org3", tokens=(40, 60), reserved=1000)
    await publish_usage(b, "set-0", key="key3", org="org3", tokens=(40, 60), reserved=1000)  # deduplicated

    async def settled() -> bool:
        c = await read_counters(a, "k", "key3")
        return c.in_flight == 1 and c.tokens_day == 1100

    assert await eventually(settled)
    assert (await submit(b, subs[2])).error is None  # the slot is free again
    # an error before the first token is settled as zero tokens: its reservation is returned
    await publish_usage(b, "set-1", key="key3", org="org3", reserved=1000, outcome="error", status=502)

    async def returned() -> bool:
        c = await read_counters(a, "k", "key3")
        return c.in_flight == 1 and c.tokens_day == 1100

    assert await eventually(returned)


async def test_a_reservation_never_settled_expires_at_the_deadline(two_schedulers: Any) -> None:
    _, _, a, _ = two_schedulers
    lim = Limits(max_concurrent=1)
    first = Submission(job=job("exp-0", deadline=1.0), tenant="org4", key_id="key4", key_limits=lim)
    assert (await submit(a, first)).error is None
    second = Submission(job=job("exp-1"), tenant="org4", key_id="key4", key_limits=lim)
    assert (await submit(a, second)).error is not None

    async def admitted() -> bool:
        return (await submit(a, second)).error is None

    assert await eventually(admitted, timeout=5.0, every=0.2)


async def test_unlimited_submissions_touch_no_counters(two_schedulers: Any) -> None:
    _, _, a, _ = two_schedulers
    assert (await submit(a, Submission(job=job("free-0"), tenant="org5", key_id="key5"))).error is None
    kv = await a.jetstream().key_value(subjects.LIMITS_BUCKET)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        keys = []
    assert subjects.limits_entry("k", "key5") not in keys and subjects.limits_entry("o", "org5") not in keys


async def test_a_stale_cache_never_skips_a_settlement(tmp_path: Path) -> None:
    """Two schedulers' quotas on one bucket: the one whose cached copy predates a reservation the
    other made must still settle it (a no-op on a cached value is re-read before it is believed)."""
    from scheduler.quota import Quota

    stack = Stack(tmp_path)
    stack.start_nats()
    nc = await stack.connect()
    try:
        kv = await open_bucket(nc, nc.jetstream(), streams.LIMITS, replicas=1)
        x, y = Quota(kv, nc.jetstream()), Quota(kv, nc.jetstream())
        lim, key = Limits(max_concurrent=5), subjects.limits_entry("k", "stale")
        await x.change(key, lambda c: L.reserve(c, lim, ask("j0", expires=time.time() + 60), time.time()))
        await y.change(key, lambda c: L.reserve(c, lim, ask("j1", expires=time.time() + 60), time.time()))
        # x's cache holds only j0; settling j1 there must find y's reservation and free it
        after = await x.change(key, lambda c: L.settle(c, "j1", 7, 0.0, time.time()))
        assert "j1" not in after.held and after.in_flight == 1
        stored = await read_counters(nc, "k", "stale")
        assert stored.in_flight == 1 and stored.tokens_day == 10 + 7
    finally:
        await nc.close()
        await stack.close()


# --- the watch that keeps each scheduler's cached counters fresh ------------------------------


@pytest.fixture
async def bucket(tmp_path: Path) -> AsyncIterator[tuple[Stack, NATS, KeyValue]]:
    """nats-server, one connection (reconnecting for ever) and the limits bucket."""
    stack = Stack(tmp_path)
    stack.start_nats()
    nc = await stack.connect(max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield stack, nc, await open_bucket(nc, nc.jetstream(), streams.LIMITS, replicas=1)
    finally:
        await nc.close()
        await stack.close()


def reserve_fn(job_id: str, lim: Limits) -> Callable[[L.Counters], L.Counters]:
    return lambda c: L.reserve(c, lim, ask(job_id, expires=time.time() + 60), time.time())


async def caught_up(quota: Quota, key: str, revision: int, timeout: float = 5.0) -> bool:
    """Does `quota`'s cache hold `revision` of `key` (or a later one) within `timeout`?"""

    async def check() -> bool:
        cached = quota.cached(key)
        return cached is not None and cached[1] >= revision

    return await eventually(check, timeout=timeout, every=0.01)


async def test_a_write_by_one_scheduler_reaches_the_others_cache(bucket: Any) -> None:
    _, nc, kv = bucket
    x, y = Quota(kv, nc.jetstream()), Quota(kv, nc.jetstream())
    await y.start()
    try:
        key, lim = subjects.limits_entry("k", "watched"), Limits(max_concurrent=5)
        written = await x.change(key, reserve_fn("j0", lim))
        cached = x.cached(key)
        assert cached is not None
        assert await caught_up(y, key, cached[1])
        assert y.cached(key) == cached and written.in_flight == 1
        # y now changes it on the value x wrote: admitted, and the stored counters hold both
        after = await y.change(key, reserve_fn("j1", lim))
        assert set(after.held) == {"j0", "j1"}
        entry = await kv.get(key)
        assert L.Counters.decode(entry.value or b"") == after and y.cached(key) == (after, entry.revision)
    finally:
        await y.stop()


async def test_watching_caches_converge_and_the_limit_is_exact(bucket: Any) -> None:
    _, nc, kv = bucket
    x, y = Quota(kv, nc.jetstream()), Quota(kv, nc.jetstream())
    await x.start()
    await y.start()
    try:
        key, lim = subjects.limits_entry("k", "race"), Limits(max_concurrent=15)
        results = await asyncio.gather(
            *(q.change(key, reserve_fn(f"j{i}", lim)) for i in range(40) for q in (x, y)), return_exceptions=True
        )
        # each job id was asked twice (once per scheduler): a second ask of a held id is a no-op
        held = {j for r in results if isinstance(r, L.Counters) for j in r.held}
        refused = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, RateLimitError) for r in refused)
        entry = await kv.get(key)
        stored = L.Counters.decode(entry.value or b"")
        assert stored.in_flight == 15 and set(stored.held) <= held
        assert await caught_up(x, key, entry.revision) and await caught_up(y, key, entry.revision)
        assert x.cached(key) == y.cached(key) == (stored, entry.revision)  # nothing older came back
    finally:
        await x.stop()
        await y.stop()


async def test_an_older_update_never_replaces_a_newer_one(bucket: Any) -> None:
    _, nc, kv = bucket
    q, key = Quota(kv, nc.jetstream()), subjects.limits_entry("k", "order")
    newer, older = L.Counters(tokens_day=2), L.Counters(tokens_day=1)
    q.observe(key, newer.encode(), 10)
    q.observe(key, older.encode(), 7)
    q.observe(key, None, 9)  # a delete older than what is cached
    assert q.cached(key) == (newer, 10)
    q.observe(key, None, 11)
    assert q.cached(key) is None
    q.observe(key, older.encode(), 12)
    assert q.cached(key) == (older, 12)


@pytest.mark.parametrize("watch", ["never", "stopped"])
async def test_a_stale_or_missing_watch_still_counts_exactly(bucket: Any, watch: str) -> None:
    """y's cache says there is room; x has taken it meanwhile. y must refuse, and its admission
    once x settles must land on x's value (a CAS on the stale revision fails and is redone)."""
    _, nc, kv = bucket
    x, y = Quota(kv, nc.jetstream()), Quota(kv, nc.jetstream())
    if watch == "stopped":
        await y.start()
        await y.stop()
    key, lim = subjects.limits_entry("k", f"stale-{watch}"), Limits(max_concurrent=2)
    await y.change(key, reserve_fn("y0", lim))
    await x.change(key, reserve_fn("x0", lim))  # full now; y's cache still shows one free slot
    with pytest.raises(RateLimitError):
        await y.change(key, reserve_fn("y1", lim))
    await x.change(key, lambda c: L.settle(c, "x0", 3, 0.0, time.time()))
    await x.change(key, reserve_fn("x1", lim))  # y's cache is behind again
    with pytest.raises(RateLimitError):
        await y.change(key, reserve_fn("y2", lim))
    await x.change(key, lambda c: L.settle(c, "x1", 4, 0.0, time.time()))
    after = await y.change(key, reserve_fn("y3", lim))
    assert set(after.held) == {"y0", "y3"} and after.tokens_day == 10 + 3 + 4 + 10
    assert L.Counters.decode((await kv.get(key)).value or b"") == after


async def test_the_watch_comes_back_after_a_lost_consumer_and_a_server_restart(bucket: Any) -> None:
    stack, nc, kv = bucket
    x, y = Quota(kv, nc.jetstream()), Quota(kv, nc.jetstream(), watch_check=0.2)
    await y.start()
    try:
        key, lim = subjects.limits_entry("k", "restart"), Limits(max_concurrent=100)
        await x.change(key, reserve_fn("j0", lim))
        assert await caught_up(y, key, (x.cached(key) or (None, 0))[1])

        stream = f"KV_{subjects.LIMITS_BUCKET}"
        for info in await nc.jetstream().consumers_info(stream):  # the watch's consumer vanishes
            await nc.jetstream().delete_consumer(stream, info.name)
        await x.change(key, reserve_fn("j1", lim))
        assert await caught_up(y, key, (x.cached(key) or (None, 0))[1], timeout=10.0)

        port = stack.nats.port  # the whole server restarts (the KV stream is on disk, the watch is not)
        stack.nats.stop()
        stack.nats = stack.nats_server(port=port, sync_always=False).start()
        assert await eventually(lambda: _answers(kv, key), timeout=15.0)
        written = await x.change(key, reserve_fn("j2", lim))
        assert await caught_up(y, key, (x.cached(key) or (None, 0))[1], timeout=20.0)
        assert y.cached(key) == x.cached(key) and written.in_flight == 3
    finally:
        await y.stop()


async def _answers(kv: KeyValue, key: str) -> bool:
    """Is the bucket back (reconnected, and JetStream has recovered its streams)?"""
    try:
        await kv.get(key)
    except (nats.errors.Error, nats.js.errors.Error):
        return False
    return True
