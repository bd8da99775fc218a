"""Lanes: when a scheduler lets a gateway place an unlimited key's next jobs itself, and the
gateway doing so (served with the scheduler frozen), never for a limited key."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from nats.aio.client import Client as NATS

from schemas.jobs import Admission, Submission
from schemas.tenancy import Limits
from tests.helpers import ECHO, FakeNodes, eventually, job, new_key, node, sdk, submit, wait_rows
from tests.scrape import value
from tests.stack import Stack

ASK = [{"role": "user", "content": "lane"}]


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[NATS]:
    """nats-server, one fake node with plenty of room, one scheduler with a weighted policy for
    the key `split`."""
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"keys": {"split": {"strategy": "weighted", "weights": {"own": 1}}}}))
    stack = Stack(tmp_path)
    stack.start_nats()
    nc = await stack.connect()
    nodes = await FakeNodes(nc, [node("n1", slots=1000)]).start()
    stack.start_scheduler(TOKENYARD_ROUTING_FILE=str(routing), TOKENYARD_LANE_CREDITS="16", TOKENYARD_LANE_TTL="0.5")
    try:
        await stack.wait_for_scheduler()

        async def ready() -> bool:
            return (await submit(nc, Submission(job=job(f"ready-{time.monotonic_ns()}")))).error is None

        assert await eventually(ready, 15)
        yield nc
    finally:
        await nodes.stop()
        await nc.close()
        await stack.close()


async def admitted(nc: NATS, sub: Submission) -> Admission:
    answer = await submit(nc, sub)
    assert answer.error is None, answer.error
    return answer


async def test_a_lane_is_granted_only_where_nothing_needs_the_scheduler(scheduler: NATS) -> None:
    nc = scheduler
    free = await admitted(nc, Submission(job=job("free"), tenant="t", key_id="k"))
    assert free.pool == "own" and free.lane_credits == 16 and free.lane_ttl == 0.5
    for why, sub in (
        (
            "a limited key is counted on every request",
            Submission(job=job("lim"), tenant="t", key_id="k2", key_limits=Limits(rpm=100)),
        ),
        ("an org limit too", Submission(job=job("org"), tenant="t", key_id="k3", org_limits=Limits(tpm=10**6))),
        (
            "a max_tokens cap is checked here",
            Submission(job=job("cap"), tenant="t", key_id="k4", key_limits=Limits(max_tokens=100)),
        ),
        (
            "a provider object chooses per request",
            Submission(
                job=job("prov", request={"model": "lim/model", "messages": [], "provider": {"only": ["own"]}}),
                tenant="t",
                key_id="k",
            ),
        ),
        (
            "a models list chooses per request",
            Submission(
                job=job("models", request={"model": "lim/model", "messages": [], "models": ["lim/model"]}),
                tenant="t",
                key_id="k",
            ),
        ),
        (
            "a re-dispatch avoids the pool that failed",
            Submission(job=job("again", dispatch=2), tenant="t", key_id="k", avoid=("other",)),
        ),
        ("a weighted split draws per request", Submission(job=job("split"), tenant="t", key_id="split")),
    ):
        assert (await admitted(nc, sub)).lane_credits == 0, why


async def test_lane_credits_never_exceed_the_idle_slots(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.start_nats()
    nc = await stack.connect()
    nodes = await FakeNodes(nc, [node("n1", slots=8, free=5)]).start()
    stack.start_scheduler(TOKENYARD_MIN_BUFFER="100", TOKENYARD_LANE_CREDITS="16")
    try:
        await stack.wait_for_scheduler()

        async def ready() -> bool:
            return bool((await submit(nc, Submission(job=job(f"r-{time.monotonic_ns()}")))).pool)

        assert await eventually(ready, 15)
        # 5 idle slots, jobs queued there (the readiness ones, nobody pulls), and this one: fewer credits than 16
        idle = await admitted(nc, Submission(job=job("idle-0"), tenant="t", key_id="k"))
        assert 0 < idle.lane_credits <= 3
        nodes.set(node("n1", slots=8, free=0))  # the pool got busy: no lane, whatever the room
        await nodes.publish()

        async def no_lane() -> bool:
            return (
                await admitted(nc, Submission(job=job(f"busy-{time.monotonic_ns()}"), tenant="t", key_id="k"))
            ).lane_credits == 0

        assert await eventually(no_lane, 5)
    finally:
        await nodes.stop()
        await nc.close()
        await stack.close()


async def lane_placements(http: httpx.AsyncClient) -> int:
    return int(value((await http.get("/metrics")).text, "tokenyard_api_lane_placements_total"))


async def test_the_gateway_places_through_its_lane_and_never_for_a_limited_key(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.start_nats()
    sched = stack.start_scheduler(TOKENYARD_LANE_TTL="60")  # long enough for a slow machine
    stack.start_worker()
    await stack.start_api(submit_timeout=0.5)
    await stack.wait_for_model(ECHO)
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http, sdk(stack) as client:
            limited = (await new_key(http, limits={"rpm": 1000}))["key"]
            first = await client.chat.completions.create(model=ECHO, messages=ASK, max_tokens=3)
            assert first.choices[0].message.content
            before = await lane_placements(http)
            sched.signal(signal.SIGSTOP)  # no scheduler answers now: only a lane can place jobs
            try:
                served = [
                    await client.chat.completions.create(model=ECHO, messages=ASK, max_tokens=3) for _ in range(2)
                ]
                assert all(r.choices[0].message.content == first.choices[0].message.content for r in served)
                assert await lane_placements(http) == before + 2
                # a limited key has no lane: it waits for a scheduler
                async with sdk(stack, timeout=1.5) as slow:
                    slow.api_key = limited
                    with pytest.raises(openai.APITimeoutError):
                        await slow.chat.completions.create(model=ECHO, messages=ASK, max_tokens=3)
            finally:
                sched.signal(signal.SIGCONT)
            # the lane's jobs are in the ledger like any other, on the route they ran
            rows = {row["job_id"]: row for row in await wait_rows(http, 3)}
            for r in served:
                row = rows[r.id.removeprefix("chatcmpl-")]
                assert row["route"] == "own" and row["outcome"] == "ok" and row["attempts"] == 1
    finally:
        await stack.close()


async def test_a_gateway_without_lanes_always_asks(echo_stack: Stack) -> None:
    url = await echo_stack.start_api(lanes=False)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http, sdk(echo_stack, url=url) as client:
        for _ in range(3):
            await client.chat.completions.create(model=ECHO, messages=ASK, max_tokens=3)
        assert await lane_placements(http) == 0
