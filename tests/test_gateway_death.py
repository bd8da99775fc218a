"""Issue 11, case 1: every job that ran ends in exactly one usage record, also when its gateway
dies. 12 streams in flight, the gateway SIGKILLed mid-stream and started again 3 s later: its
workers notice and stop, report what they generated, and each job gets one ledger row counted
by the worker, with the worker's tokens and the tenant the gateway sealed into the job. With
the gateway alive, each job gets one row counted by the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import openai
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, StreamConfig

from broker_api.ledger_store import TABLES, SqliteStore
from schemas import subjects
from schemas.usage import UsageRecord
from tests.cluster import NatsCluster
from tests.helpers import ECHO, Sse, sdk
from tests.stack import Proc, Stack, auth_headers
from tests.test_cluster import usage_messages

STREAMS = 12


async def rows_of(url: str, jobs: set[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """The gateway's ledger rows once it holds every job of `jobs`, re-read a moment later so
    that a late duplicate would show."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=30) as http:
        while True:
            r = await http.get("/v1/admin/usage/export", params={"format": "json"})
            rows = r.json()["data"] if r.status_code == 200 else []
            if jobs <= {row["job_id"] for row in rows}:
                await asyncio.sleep(1.0)
                rows = (await http.get("/v1/admin/usage/export", params={"format": "json"})).json()["data"]
                by_job = {row["job_id"]: row for row in rows}
                assert len(by_job) == len(rows), "two rows for one job"
                return by_job
            assert time.monotonic() < deadline, f"{len(rows)} rows, {len(jobs - {x['job_id'] for x in rows})} missing"
            await asyncio.sleep(0.2)


def stopped_counts(log: str) -> dict[str, int]:
    """job id -> the tokens the worker had generated when it stopped the job (its info log)."""
    out = {}
    for line in log.splitlines():
        if "job.stopped" in line:
            job = re.search(r"job_id=(\w+)", line)
            tokens = re.search(r"tokens=(\d+)", line)
            if job and tokens:
                out[job.group(1)] = int(tokens.group(1))
    return out


async def open_streams(client: openai.AsyncOpenAI, n: int) -> list[Any]:
    streams = []
    for i in range(n):
        stream = await client.chat.completions.create(
            model=ECHO,
            messages=[{"role": "user", "content": f"s{i} [[tokens=400]] [[rate=20]]"}],
            stream=True,
        )
        first = await stream.__anext__()
        assert first.choices[0].delta.content
        streams.append((first.id.removeprefix("chatcmpl-"), stream))
    return streams


async def answered_with_usage_held(
    stack: Stack, env: dict[str, str], *, model_timeout: float = 30.0
) -> tuple[Proc, NATS, StreamConfig, str]:
    """A gateway of its own (`env`) answers one request whole while the usage stream is held
    shut (`hold_usage_shut`), so the job's record still waits: the gateway, the test's
    connection, the stream's config to reopen it with, and the job's id."""
    api, url = await stack.spawn_api(**env)
    stack.api_url = url
    await stack.wait_for_model(ECHO, timeout=model_timeout)
    nc = await stack.bus()
    held = await hold_usage_shut(nc)
    async with sdk(stack, url=url) as client:
        answer = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "kept [[tokens=7]]"}]
        )
    return api, nc, held, answer.id.removeprefix("chatcmpl-")


async def billed_once_by_the_worker(stack: Stack, env: dict[str, str], job: str, *, timeout: float) -> None:
    """A gateway started again (`env`) holds exactly one row for `job`: the worker's report of
    all 7 tokens, with the key the first gateway sealed into the job."""
    _, again = await stack.spawn_api(**env)
    rows = await rows_of(again, {job}, timeout=timeout)
    assert set(rows) == {job}
    row = rows[job]
    assert row["counted_by"] == "worker" and row["completion_tokens"] == 7 and row["key_id"], row


async def test_a_gateway_killed_mid_stream_leaves_every_job_billed_once_by_its_worker(stack: Stack) -> None:
    worker = stack.start_worker(TOKENYARD_SLOTS="32", TOKENYARD_LOG_LEVEL="info", TOKENYARD_HEARTBEAT="0.2")
    port_env = {"TOKENYARD_ORPHAN_GRACE": "1", "TOKENYARD_DATA_DIR": str(stack.tmp / "gw")}
    api, url = await stack.spawn_api(**port_env)
    stack.api_url = url
    await stack.wait_for_model(ECHO)
    async with sdk(stack, url=url) as client:
        streams = await open_streams(client, STREAMS)
        api.kill()  # SIGKILL mid-stream: no chance to write a record
        killed = time.monotonic()
        jobs = {job for job, _ in streams}
        # the workers notice within a few heartbeats and stop
        deadline = time.monotonic() + 5
        while set(stopped_counts(worker.output())) < jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stopped = stopped_counts(worker.output())
        assert set(stopped) >= jobs and time.monotonic() - killed < 5
        for _, stream in streams:
            await stream.close()
    await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - killed)))
    _, again = await stack.spawn_api(**port_env)  # the same data dir: its ledger goes on
    rows = await rows_of(again, jobs)
    assert set(rows) == jobs  # exactly one row per job, and no other
    for job in jobs:
        row = rows[job]
        assert row["counted_by"] == "worker", row
        assert row["completion_tokens"] == stopped[job] > 0, row
        assert row["outcome"] == "cancelled" and row["route"] == "own" and row["key_id"] and row["org"], row


async def test_with_its_gateway_alive_each_job_is_billed_once_by_the_gateway(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="32")
    await stack.start_api(orphan_grace=1.0)
    await stack.wait_for_model(ECHO)
    async with sdk(stack) as client:
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=ECHO, messages=[{"role": "user", "content": f"a{i} [[tokens=20]] [[rate=100]]"}]
                )
                for i in range(STREAMS)
            )
        )
    jobs = {a.id.removeprefix("chatcmpl-") for a in answers}
    await asyncio.sleep(2.0)  # past the orphan grace: a worker's report, had one been made, would be in
    rows = await rows_of(stack.api_url, jobs)
    assert set(rows) == jobs
    assert all(r["counted_by"] == "gateway" and r["completion_tokens"] == 20 for r in rows.values())


async def test_a_gateway_killed_before_its_record_was_stored_leaves_the_job_to_its_worker(stack: Stack) -> None:
    """The client got its whole answer, but the gateway died while JetStream could not take its
    usage record yet (the chaos run on a cluster lost 169 of 12,000 so): the worker, whose
    final DONE was answered only once the record is stored, reports the job itself."""
    stack.start_worker(TOKENYARD_SLOTS="4")
    env = {"TOKENYARD_ORPHAN_GRACE": "1", "TOKENYARD_DATA_DIR": str(stack.tmp / "gw")}
    api, nc, held, job = await answered_with_usage_held(stack, env)
    api.kill()  # its record still waits for the stream
    await reopen_usage(nc, held)  # the stream takes records again
    await billed_once_by_the_worker(stack, env, job, timeout=40.0)


async def hold_usage_shut(nc: NATS) -> StreamConfig:
    """Make the usage stream take nothing more for now (as during a leader election, but for
    longer); returns its config, to reopen it with `reopen_usage`."""
    js = nc.jetstream()
    usage = await js.stream_info(subjects.USAGE_STREAM)
    held = usage.config
    await js.update_stream(dataclasses.replace(held, max_msgs=max(1, usage.state.messages), discard=DiscardPolicy.NEW))
    if usage.state.messages == 0:  # max_msgs=1 still takes one: fill it with a record of no job
        await js.publish(subjects.usage_subject("filler"), b"", headers={"Nats-Msg-Id": "filler"})
    return held


async def reopen_usage(nc: NATS, held: StreamConfig, timeout: float = 30.0) -> None:
    """Let the usage stream take records again; retried while a killed node's streams elect new
    leaders (and the test's own connection finds another node)."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.update_stream(held)
            await js.purge_stream(subjects.USAGE_STREAM, subject=subjects.usage_subject("filler"))
            return
        except (nats.errors.Error, asyncio.TimeoutError):
            assert time.monotonic() < deadline, "the usage stream could not be reopened"
            await asyncio.sleep(0.5)


async def test_a_gateway_and_its_worker_killed_together_after_the_answer_leave_the_job_billed_once(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Two faults in one window, on a cluster: the client has its whole answer, the gateway's
    record cannot be stored yet, and the gateway and the job's worker are SIGKILLed together,
    with a NATS node down across that window. Nobody holds the job's count in memory any more:
    the job's work message, acked only once its billing is settled, is delivered again, and the
    worker that takes it finds the gateway gone and reports it. One row, counted by the worker."""
    stack = Stack(tmp_path, nats_url=nats_cluster.url, auth=False)
    try:
        stack.start_scheduler(TOKENYARD_REPLICAS="0")
        worker = stack.start_worker(TOKENYARD_SLOTS="4", TOKENYARD_NODE_ID="first")
        env = {"TOKENYARD_ORPHAN_GRACE": "1", "TOKENYARD_DATA_DIR": str(tmp_path / "gw"), "TOKENYARD_REPLICAS": "0"}
        api, nc, held, job = await answered_with_usage_held(stack, env, model_timeout=60)
        api.kill()  # its record still waits for the stream
        worker.kill()  # and the worker that waited for the gateway's word on it
        nats_cluster.kill(0)
        await asyncio.sleep(1.0)
        await reopen_usage(nc, held)
        stack.start_worker(TOKENYARD_SLOTS="4", TOKENYARD_NODE_ID="second")
        await asyncio.sleep(5.0)  # the job's message comes back to it with the node still down
        await asyncio.to_thread(nats_cluster.restart, 0)
        await nats_cluster.wait_for_jetstream()
        await billed_once_by_the_worker(stack, env, job, timeout=60.0)
        assert (await usage_messages(nc)).get(job) == 1
    finally:
        await stack.close()


async def test_a_job_delivered_again_while_its_record_waits_is_reported_when_the_gateway_dies(stack: Stack) -> None:
    """Three faults in one window (the long chaos run on a cluster lost 5 of 12,000 jobs so):
    the gateway's record waits for JetStream, the worker that answered dies before hearing it is
    stored, the job is delivered again to another worker, and then the gateway dies too. The
    gateway holds the second worker's final DONE like the first (it does not tell it "stop":
    the record is not stored), so that worker reports the job once the gateway is gone."""
    first = stack.start_worker(TOKENYARD_SLOTS="4", TOKENYARD_NODE_ID="first")
    env = {"TOKENYARD_ORPHAN_GRACE": "1", "TOKENYARD_DATA_DIR": str(stack.tmp / "gw")}
    api, nc, held, job = await answered_with_usage_held(stack, env)
    first.kill()  # before the gateway could say the job is billed
    second = stack.start_worker(TOKENYARD_SLOTS="4", TOKENYARD_NODE_ID="second", TOKENYARD_LOG_LEVEL="info")
    deadline = time.monotonic() + 30
    while not re.search(rf"job\.(done|stopped) .*job_id={job}", second.output()):  # it ran the job again
        assert time.monotonic() < deadline, second.output()[-2000:]
        await asyncio.sleep(0.1)
    api.kill()  # and now the gateway, its record still not stored
    await reopen_usage(nc, held)
    await billed_once_by_the_worker(stack, env, job, timeout=60.0)


async def test_an_older_ledger_gains_counted_by_and_stores_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:  # the table as ledgers before `counted_by` made it
        db.executescript(TABLES.replace(",\n    counted_by TEXT NOT NULL DEFAULT 'gateway'", ""))
        db.execute(
            "INSERT INTO usage VALUES ('old', 1.0, '1970-01-01', 'o', '', 'k', 'm', 'r', 'n', 1, 1, 1, 0, 0, 0, 0, "
            "'ok', 200, 0)"
        )
    store = await SqliteStore.open(path)
    try:
        record = UsageRecord("new", 2.0, "o", "", "k", "m", "own", "w", 1, 3, 4, 0, 0.0, 0.0, 5.0, "cancelled", 502)
        await store.add_usage([dataclasses.replace(record, counted_by="worker")])
        rows = await store.usage_page(org=None, since=None, until=None, after=None, limit=10)
    finally:
        await store.close()
    assert {r["job_id"]: r["counted_by"] for r in rows} == {"old": "gateway", "new": "worker"}


def own_gateway_env(stack: Stack) -> dict[str, str]:
    """A gateway whose jobs have a 10 s deadline, its ledger in a data dir of its own (a gateway
    started again with it reads the same ledger), reports billed 1 s after they come."""
    return {
        "TOKENYARD_ORPHAN_GRACE": "1",
        "TOKENYARD_DATA_DIR": str(stack.tmp / "gw"),
        "TOKENYARD_REQUEST_TIMEOUT": "10",
    }


@contextlib.asynccontextmanager
async def streaming_on_its_own_gateway(stack: Stack, tag: str) -> AsyncIterator[tuple[Proc, str, int]]:
    """A long stream through a gateway of its own (`own_gateway_env`), once 3 words reached the
    client: that gateway, the job's id and the words received. The stream is closed on the way
    out (its gateway is usually dead by then)."""
    api, url = await stack.spawn_api(**own_gateway_env(stack))
    stack.api_url = url
    await stack.wait_for_model(ECHO)
    async with sdk(stack, url=url) as client:
        stream = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": f"{tag} [[tokens=400]] [[rate=20]]"}], stream=True
        )
        try:
            cut = await Sse().drain(stream, until=lambda s: s.texts >= 3)
            yield api, cut.id.removeprefix("chatcmpl-"), cut.texts
        finally:
            with contextlib.suppress(Exception):
                await stream.close()


async def the_row_of_its_gateway_again(stack: Stack, job: str) -> dict[str, Any]:
    """`job`'s one ledger row, as a gateway started again on `own_gateway_env`'s data dir reads
    it (where the worker's report of it was billed)."""
    _, again = await stack.spawn_api(**own_gateway_env(stack))
    return (await rows_of(again, {job}, timeout=60))[job]


async def test_a_gateway_killed_while_it_continues_an_answer_leaves_the_job_to_the_attempt_it_gave_up_on(
    stack: Stack,
) -> None:
    """The long chaos run at load ~20 (RESULTS section 9, run 7): a gateway gave up on a silent
    attempt after 4 words reached the client, asked a scheduler to place the continuation, and
    was SIGKILLed before that was placed. The attempt it gave up on, told to stop, had its count
    answered "stop" at once and settled its message, so nobody billed the 4 words. Now a gateway
    answers such an attempt's count only once the job's record is stored, and the worker,
    unanswered, reports the job. The continuation's placement is held here by a stopped
    scheduler; the worker is stopped past the silence bound, then let go."""
    scheduler = next(p for p in stack.procs if p.name == "scheduler")
    # an ack wait past the stop: the job is not delivered again meanwhile (that delivery's own
    # report, of its first token, could then be the job's one record)
    worker = stack.start_worker(TOKENYARD_LOG_LEVEL="info", TOKENYARD_HEARTBEAT="0.2", TOKENYARD_ACK_WAIT="10")
    async with streaming_on_its_own_gateway(stack, "g") as (api, job, words):
        scheduler.signal(signal.SIGSTOP)  # the continuation's placement waits
        worker.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(2.5)  # past the silence: the gateway gives up on the attempt and continues
        finally:
            worker.signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while job not in stopped_counts(worker.output()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert job in stopped_counts(worker.output()), "the gateway did not stop the attempt it gave up on"
        api.kill()  # before the continuation is placed, let alone billed
        scheduler.signal(signal.SIGCONT)
    row = await the_row_of_its_gateway_again(stack, job)
    assert row["counted_by"] == "worker" and row["completion_tokens"] >= words and row["key_id"], row


async def test_a_gateway_killed_after_its_job_went_to_a_delivery_told_to_stop_leaves_the_job_billed(
    stack: Stack,
) -> None:
    """Chaos runs 10 and 11 (RESULTS section 9, traced in run 11a): the worker whose words
    reached the client died; the gateway gave up on its attempt and asked a scheduler to
    continue the answer; JetStream delivered the job again to another worker, whose attempt the
    gateway told to stop (the answer had started); then the gateway died before the
    continuation was placed. That
    attempt's count was answered "stop" at once, so its worker settled the job's work message,
    the one record left that the job ran, and nobody billed it. Now the count waits for the
    job's record, and the worker, unanswered by the job's deadline, reports the job. The
    continuation's placement is held here by a stopped scheduler, killed once the gateway is."""
    scheduler = next(p for p in stack.procs if p.name == "scheduler")
    quick = {"TOKENYARD_LOG_LEVEL": "info", "TOKENYARD_HEARTBEAT": "0.2", "TOKENYARD_ACK_WAIT": "2"}
    first = stack.start_worker(TOKENYARD_NODE_ID="first", **quick)
    async with streaming_on_its_own_gateway(stack, "d") as (api, job, _):  # its deadline: the count's wait
        scheduler.signal(signal.SIGSTOP)  # the continuation's placement waits
        first.kill()  # with the words the client has, and never a word about them
        second = stack.start_worker(TOKENYARD_NODE_ID="second", **quick)
        deadline = time.monotonic() + 20
        while not re.search(rf"job\.stopped .*job_id={job}", second.output()):  # delivered again, told to stop
            assert time.monotonic() < deadline, second.output()[-2000:]
            await asyncio.sleep(0.05)
        assert "not the winning attempt" in second.output()
        api.kill()  # before the continuation is placed, let alone billed
        scheduler.kill()  # and it never will be (a stopped one, let go, would place it after all)
    row = await the_row_of_its_gateway_again(stack, job)
    assert row["counted_by"] == "worker" and row["node"] == "second" and row["key_id"], row
