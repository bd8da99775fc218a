"""Tokenyard on a real three-node JetStream cluster (fsync always): two gateways, two
schedulers, three echo workers and the ledger role, all following the cluster (`--replicas 0`).

- every stream and bucket the roles create has three replicas (the cache one, by design), and
  their durable consumers follow;
- key creation and revocation with one node of three down succeed and take effect on the other
  gateway; with two down (no quorum) an admin write is a 503 with Retry-After, never a 500;
- a NATS node SIGKILLed and restarted under load (the work stream's leader): every request ends
  in an answer or an explicit error, nothing runs twice, one usage record and one ledger row
  per job that ran;
- a key's rpm holds exactly across both gateways and both schedulers; then a gateway and a
  scheduler SIGKILLed under load: the other gateways' requests all succeed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS

from schemas import streams, subjects
from schemas.jetstream import stream_info
from tests.cluster import NatsCluster
from tests.helpers import ECHO
from tests.stack import Proc, Stack, auth_headers

ROLE_ENV = {"TOKENYARD_INTAKE_ACK_WAIT": "2", "TOKENYARD_REPLICAS": "0"}
PRODUCT_STREAMS = {
    streams.WORK.name,
    streams.INTAKE.name,
    streams.USAGE.name,
    streams.AUDIT.name,
    *(b.stream.name for b in (streams.KEYS, streams.ORGS, streams.CACHE, streams.LIMITS, streams.IDEMPOTENCY)),
    streams.ROUTING.stream.name,
}


@dataclass
class ClusterStack:
    cluster: NatsCluster
    stack: Stack
    gateways: list[str]
    schedulers: list[Proc]
    ledger: Proc

    async def nc(self) -> NATS:
        return await self.stack.bus()


@pytest.fixture
async def on_cluster(nats_cluster: NatsCluster, tmp_path: Path) -> AsyncIterator[ClusterStack]:
    stack = Stack(tmp_path, nats_url=nats_cluster.url, auth=False)  # the cluster runs without auth
    try:
        schedulers = [stack.start_scheduler(**ROLE_ENV) for _ in range(2)]
        ledger, _ = stack.start_ledger(TOKENYARD_LEDGER_ACK_WAIT="2", TOKENYARD_FLEET_EVENTS="false")
        for _ in range(3):
            stack.start_worker(TOKENYARD_SLOTS="4")
        gateways = [await stack.start_api(ledger=False, replicas=0, request_timeout=60.0) for _ in range(2)]
        await stack.wait_for_model(ECHO, nodes=3, timeout=60)
        yield ClusterStack(nats_cluster, stack, gateways, schedulers, ledger)
    finally:
        await stack.close()


def chat(i: int, tokens: int = 5, rate: int = 200) -> dict[str, Any]:
    prompt = f"job {i} [[tokens={tokens}]] [[rate={rate}]]"
    return {"model": ECHO, "messages": [{"role": "user", "content": prompt}]}


@dataclass
class Outcome:
    status: int  # 0: the connection failed (a killed gateway)
    seconds: float = 0.0
    job_id: str = ""
    content: str = ""
    retry_after: str | None = None
    error: str = ""  # a refusal's message: what a failed assertion shows


async def call(http: httpx.AsyncClient, url: str, body: dict[str, Any], key: str = "") -> Outcome:
    start = time.monotonic()
    try:
        r = await http.post(f"{url}/v1/chat/completions", json=body, headers=auth_headers(key) if key else None)
    except httpx.TransportError:
        return Outcome(0, time.monotonic() - start)
    took = time.monotonic() - start
    if r.status_code != 200:
        return Outcome(r.status_code, took, retry_after=r.headers.get("retry-after"), error=r.text[:200])
    answer = r.json()
    return Outcome(200, took, answer["id"].removeprefix("chatcmpl-"), answer["choices"][0]["message"]["content"])


async def load(urls: list[str], n: int, *, concurrency: int = 8, start: int = 0) -> list[Outcome]:
    """`n` requests spread over the gateways, `concurrency` at a time, each answered in about
    0.3 s (5 tokens at 15 a second), so 160 of them take some 6 s."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=auth_headers(), timeout=90) as http:

        async def one(i: int) -> Outcome:
            async with gate:
                return await call(http, urls[i % len(urls)], chat(i, rate=15))

        return await asyncio.gather(*(one(i) for i in range(start, start + n)))


async def usage_messages(nc: NATS) -> dict[str, int]:
    """Usage records in the stream per job id (JetStream's per-subject counts)."""
    info = await nc.jetstream().stream_info(subjects.USAGE_STREAM, subjects_filter=subjects.USAGE_ALL)
    return {subject.rsplit(".", 1)[-1]: count for subject, count in (info.state.subjects or {}).items()}


async def ledger_rows(url: str, want: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
    """The ledger role's export (through a gateway) once it holds every job in `want`."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=30) as http:
        while True:
            r = await http.get("/v1/admin/usage/export", params={"format": "json"})
            rows = r.json()["data"] if r.status_code == 200 else []
            if want <= {row["job_id"] for row in rows}:
                return rows
            assert time.monotonic() < deadline, f"ledger: {r.status_code}, {len(rows)} rows, want {len(want)}"
            await asyncio.sleep(0.2)


async def check_once_each(s: ClusterStack, outcomes: list[Outcome]) -> None:
    """Every answer its own job's text; one usage record and one ledger row per job that ran."""
    answered = [o for o in outcomes if o.status == 200]
    for o in answered:
        assert o.content.startswith("job ") and len(o.content.split()) == 5, o.content
    jobs = {o.job_id for o in answered}
    assert len(jobs) == len(answered), "two answers share a job"
    deadline = time.monotonic() + 30
    while True:  # the ledger holds exactly what the stream holds, once it has caught up
        rows = await ledger_rows(s.gateways[-1], jobs)
        by_job = [row["job_id"] for row in rows]
        per_job = await usage_messages(await s.nc())
        if set(per_job) == set(by_job) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(by_job) == len(set(by_job)) and set(per_job) == set(by_job)
    assert all(per_job.get(job) == 1 for job in jobs), {j: per_job.get(j) for j in jobs if per_job.get(j) != 1}
    assert all(count == 1 for count in per_job.values())


async def until_status(http: httpx.AsyncClient, url: str, key: str, status: int, timeout: float = 10.0) -> float:
    """Seconds until a request with `key` gets `status` from the gateway at `url`. A gateway
    whose KV watch ran through the node that died reopens it first (`schemas.jetstream.follow`)."""
    start = time.monotonic()
    while (got := (await call(http, url, chat(0), key=key)).status) != status:
        assert time.monotonic() - start < timeout, f"{url} still answers {got}, not {status}"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def node_of(leader: str) -> int:
    return int(leader.removeprefix("n")) - 1


async def test_every_stream_and_bucket_three_replicas_and_admin_writes_with_nodes_down(
    on_cluster: ClusterStack,
) -> None:
    s = on_cluster
    nc = await s.nc()
    names = {info.config.name for info in await nc.jetstream().streams_info()}
    assert PRODUCT_STREAMS <= names, PRODUCT_STREAMS - names
    for name in sorted(names):
        info = await stream_info(nc, name)
        assert info is not None
        want = 1 if name == streams.CACHE.stream.name else 3  # the cache: see schemas/streams.py
        assert info["config"]["num_replicas"] == want, name
        for consumer in await nc.jetstream().consumers_info(name):
            if not consumer.config.durable_name:
                continue  # a watch's ordered consumer: one replica in memory, made again if lost
            peers = 1 + len(consumer.cluster.replicas or []) if consumer.cluster else 1
            assert peers == want, f"{name}/{consumer.name}: {peers} replicas"

    a, b = s.gateways
    async with httpx.AsyncClient(headers=auth_headers(), timeout=30) as http:
        s.cluster.kill(node_of((await stream_info(nc, streams.KEYS.stream.name) or {})["cluster"]["leader"]))
        made = await http.post(f"{a}/v1/admin/keys", json={"name": "while-a-node-is-down"})
        assert made.status_code == 201, made.text
        secret, key_id = made.json()["key"], made.json()["id"]
        assert (await http.post(f"{a}/v1/admin/orgs", json={"name": "acme"})).status_code == 201
        policy = {"strategy": "most_free"}
        assert (await http.put(f"{b}/v1/admin/routing/default", json=policy)).status_code == 200
        took = await until_status(http, b, secret, 200)  # the other gateway learns the key...
        revoked = await http.post(f"{b}/v1/admin/keys/{key_id}/revoke")
        assert revoked.status_code == 200 and revoked.json()["revoked"], revoked.text
        took = max(took, await until_status(http, a, secret, 401))  # ...and of its revocation
        print(f"with a node down, the other gateway followed within {took:.2f} s")

        # two of three down: no quorum; a write is refused with 503 and Retry-After, not a 500
        second = next(i for i, n in enumerate(s.cluster.nodes) if n.proc and n.proc.poll() is None)
        s.cluster.kill(second)
        refused = await http.post(f"{a}/v1/admin/keys", json={"name": "no-quorum"})
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "unavailable"

        for i, node in enumerate(s.cluster.nodes):
            if node.proc is None or node.proc.poll() is not None:
                s.cluster.restart(i)
        deadline = time.monotonic() + 30
        while (await http.post(f"{a}/v1/admin/keys", json={"name": "after"})).status_code != 201:
            assert time.monotonic() < deadline, "admin writes did not come back with the quorum"
            await asyncio.sleep(0.2)


async def test_a_nats_node_killed_and_restarted_under_load(on_cluster: ClusterStack) -> None:
    s = on_cluster
    nc = await s.nc()
    work_leader = node_of((await stream_info(nc, streams.WORK.name) or {})["cluster"]["leader"])
    running = asyncio.create_task(load(s.gateways, 160, concurrency=8))
    await asyncio.sleep(1.5)
    s.cluster.kill(work_leader)  # the work queue's leader: JetStream elects another under load
    await asyncio.sleep(2.0)
    s.cluster.restart(work_leader)
    outcomes = await running
    statuses = [o.status for o in outcomes]
    slowest = max(o.seconds for o in outcomes)
    print(f"node n{work_leader + 1} killed under load: {statuses.count(200)} answered, slowest {slowest:.1f} s")
    assert all(o.status in (200, 503) for o in outcomes), [o for o in outcomes if o.status != 200]
    assert all(o.retry_after for o in outcomes if o.status == 503)
    assert statuses.count(200) >= 150, statuses
    await check_once_each(s, outcomes)


async def test_rpm_exact_then_a_gateway_and_a_scheduler_killed_under_load(on_cluster: ClusterStack) -> None:
    s = on_cluster
    # a key's rpm holds exactly across both gateways and both schedulers
    async with httpx.AsyncClient(headers=auth_headers(), timeout=30) as http:
        made = await http.post(f"{s.gateways[0]}/v1/admin/keys", json={"name": "rpm", "limits": {"rpm": 10}})
        secret = made.json()["key"]
        await until_status(http, s.gateways[1], secret, 200)  # the other gateway's mirror has it (uses one)
        outcomes = await asyncio.gather(*(call(http, s.gateways[i % 2], chat(i), key=secret) for i in range(24)))
    statuses = sorted(o.status for o in outcomes)
    assert statuses == [200] * 9 + [429] * 15, statuses
    # then kill a gateway (its own process) and a scheduler while both carry load
    proc, spawned = await s.stack.spawn_api(TOKENYARD_LEDGER="false")
    survivors = asyncio.create_task(load(s.gateways, 120, concurrency=6))
    doomed = asyncio.create_task(load([spawned], 40, concurrency=4, start=1000))
    await asyncio.sleep(1.5)
    proc.kill()
    s.schedulers[0].kill()
    outcomes = await survivors
    assert [o.status for o in outcomes].count(200) == 120, [o for o in outcomes if o.status != 200][:5]
    lost = await doomed
    print(f"killed gateway: {[o.status for o in lost].count(200)} of {len(lost)} answered before it died")
    assert all(o.status in (0, 200) for o in lost)  # cut off, never left hanging
    await check_once_each(s, [*outcomes, *lost])
