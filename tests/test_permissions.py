"""What an enrolled node's NATS identity may do: serve its models in its pool, and nothing else.
Each denial is proven against a real nats-server running Tokenyard's JWT auth."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from broker_api.nats_auth import AuthDir, write_secret
from schemas import permissions, streams, subjects
from schemas.jetstream import ensure
from tests.helpers import ECHO
from tests.stack import Stack

OTHER = "secret/model"
NODE = "nd-1"
POOL = "lab"


def consumer(pool: str, model: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.work_consumer(pool, model),
        filter_subject=subjects.work_subject(pool, model),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=1.5,
        max_deliver=3,
        max_waiting=4096,
    )


@pytest.fixture
async def secured(tmp_path: Path) -> Stack:
    stack = Stack(tmp_path)
    stack.start_nats()
    ops = await stack.bus()
    await ensure(ops, streams.WORK)
    for pool, model in ((POOL, OTHER), ("prov-a", ECHO)):  # queues the node must not touch
        await ops.jetstream().add_consumer(subjects.WORK_STREAM, consumer(pool, model))
    try:
        yield stack
    finally:
        await stack.close()


def node_creds(stack: Stack, node: str = NODE, pool: str = POOL, models: tuple[str, ...] = (ECHO,)) -> str:
    assert stack.auth is not None
    path = stack.tmp / f"{node}.creds"
    write_secret(path, stack.auth.issue(node, permissions.node(node, pool, models))[0])
    return str(path)


async def test_a_node_creates_and_pulls_its_own_consumer(secured: Stack) -> None:
    """No operator step: the node makes its consumer itself (the create names its filter, so
    the permission allows exactly that consumer), then a job placed there reaches it."""
    node = await nats.connect(
        secured.nats_url, user_credentials=node_creds(secured), inbox_prefix=subjects.worker_inbox(POOL, NODE)
    )
    try:
        js = node.jetstream()
        psub = await js.pull_subscribe(
            subjects.work_subject(POOL, ECHO),
            durable=subjects.work_consumer(POOL, ECHO),
            stream=subjects.WORK_STREAM,
            config=consumer(POOL, ECHO),
        )
        with pytest.raises(TimeoutError):  # empty queue: a timeout, not a denial
            await psub.fetch(1, timeout=0.3)
        ops = (await secured.bus()).jetstream()
        await ops.publish(subjects.work_subject(POOL, ECHO), b"job")
        [msg] = await psub.fetch(1, timeout=5)
        assert msg.data == b"job"
        await msg.ack()
    finally:
        await node.close()


async def test_a_node_is_denied_everything_else(secured: Stack) -> None:
    violations: list[str] = []

    async def on_error(e: Exception) -> None:
        violations.append(str(e))

    node = await nats.connect(
        secured.nats_url,
        user_credentials=node_creds(secured),
        inbox_prefix=subjects.worker_inbox(POOL, NODE),
        error_cb=on_error,
    )
    try:
        # allowed: its advert, events to a gateway, its control subject
        await node.publish(subjects.fleet_heartbeat(NODE), b"")
        await node.publish(subjects.reply_subject("gw", "job"), b"")
        await node.subscribe(subjects.node_control(NODE))
        await node.flush()
        await asyncio.sleep(0.2)
        assert violations == []
        denied_subscriptions = [
            subjects.WORK_ALL,
            "ty.reply.>",
            "_INBOX.>",
            subjects.worker_inbox(POOL, "nd-2") + ".>",  # another node's inbox: its jobs arrive there
            subjects.pool_inboxes(POOL),
            subjects.node_control("nd-2"),
            subjects.FLEET_HEARTBEAT_ALL,
            "$KV.>",
            subjects.SCHED_SUBMIT,
            subjects.usage_subject("*"),
        ]
        for subject in denied_subscriptions:
            await node.subscribe(subject)
        denied_publishes = [
            subjects.fleet_heartbeat("nd-2"),  # speaking as another node
            subjects.SCHED_SUBMIT,
            subjects.work_subject(POOL, ECHO),  # placing jobs
            f"$JS.API.STREAM.INFO.{subjects.WORK_STREAM}",
            f"$JS.API.STREAM.CREATE.{subjects.WORK_STREAM}",
            "$JS.API.STREAM.NAMES",
            subjects.js_consumer_next(subjects.WORK_STREAM, subjects.work_consumer(POOL, OTHER)),  # another model
            subjects.js_consumer_next(subjects.WORK_STREAM, subjects.work_consumer("prov-a", ECHO)),  # a cloud pool
            subjects.js_consumer_create(
                subjects.WORK_STREAM, subjects.work_consumer("prov-a", ECHO), subjects.work_subject("prov-a", ECHO)
            ),
            f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.WORK_STREAM}.{subjects.work_consumer(POOL, ECHO)}",
            f"$JS.API.DIRECT.GET.KV_{subjects.KEYS_BUCKET}",
            f"$KV.{subjects.NODES_BUCKET}.{NODE}",  # writing its own registry record
            subjects.usage_subject("job"),
            subjects.audit_subject("event"),
            subjects.SYS_CLAIMS_UPDATE,
        ]
        for subject in denied_publishes:
            await node.publish(subject, b"{}")
        await node.flush()
        deadline = asyncio.get_running_loop().time() + 5
        expected = len(denied_subscriptions) + len(denied_publishes)
        while len(violations) < expected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        text = "\n".join(violations).lower()  # nats-py lower-cases the server's message
        for subject in denied_subscriptions:
            assert f'permissions violation for subscription to "{subject.lower()}"' in text, text
        for subject in denied_publishes:
            assert f'permissions violation for publish to "{subject.lower()}"' in text, text
        for pool, model in ((POOL, OTHER), ("prov-a", ECHO)):  # and other queues cannot be pulled
            with pytest.raises(nats.errors.Error):
                other = await node.jetstream().pull_subscribe(
                    subjects.work_subject(pool, model),
                    durable=subjects.work_consumer(pool, model),
                    stream=subjects.WORK_STREAM,
                )
                await other.fetch(1, timeout=0.5)
    finally:
        await node.close()


async def test_a_filter_other_than_the_consumers_own_is_refused_by_the_server(secured: Stack) -> None:
    """The create the node may send names the filter; a body with another filter (say, a cloud
    pool's subjects under its own consumer's name) is refused by nats-server itself."""
    node = await nats.connect(
        secured.nats_url, user_credentials=node_creds(secured), inbox_prefix=subjects.worker_inbox(POOL, NODE)
    )
    try:
        sneaky = consumer(POOL, ECHO)
        sneaky.filter_subject = subjects.work_subject("prov-a", ECHO)
        subject = subjects.js_consumer_create(
            subjects.WORK_STREAM, subjects.work_consumer(POOL, ECHO), subjects.work_subject(POOL, ECHO)
        )
        body = {"stream_name": subjects.WORK_STREAM, "config": sneaky.as_dict()}
        reply = await node.request(subject, json.dumps(body).encode(), timeout=2)
        answer = json.loads(reply.data)
        assert "error" in answer, answer
        info = await (await secured.bus()).jetstream().consumers_info(subjects.WORK_STREAM)
        assert subjects.work_consumer(POOL, ECHO) not in {c.name for c in info}
    finally:
        await node.close()


@pytest.mark.parametrize("served", [1, 100], ids=["one-model", "100-models"])
async def test_a_cloud_adapter_pulls_only_its_own_models_work(secured: Stack, served: int) -> None:
    """An adapter issued with its provider's models (as `tokenyard up --providers` and `auth init
    --providers` issue it) may pull its own models' consumers of its pool, and no other pool's or
    model's work: the jobs queued there stay for their own workers. However many models it has
    (more than 64 used to fall back to a wildcard over every consumer name: any pool's work)."""
    assert secured.auth is not None
    models = (ECHO, *(f"prov-model-{i}" for i in range(served - 1)))
    AuthDir.init(secured.auth.path, adapters={"prov-b": models})
    ops = await secured.bus()
    ojs = ops.jetstream()
    await ojs.add_consumer(subjects.WORK_STREAM, consumer("prov-b", OTHER))  # its pool, a model it does not serve
    for pool, model in ((POOL, OTHER), ("prov-a", ECHO), ("prov-b", OTHER), ("prov-b", ECHO)):
        await ojs.publish(subjects.work_subject(pool, model), f"{pool}/{model}".encode())
    violations: list[str] = []

    async def on_error(e: Exception) -> None:
        violations.append(str(e).lower())

    adapter = await nats.connect(
        secured.nats_url,
        user_credentials=secured.creds("adapter-prov-b"),
        inbox_prefix=subjects.worker_inbox("prov-b", "a1"),
        error_cb=on_error,
    )
    try:
        js = adapter.jetstream()
        own = await js.pull_subscribe(
            subjects.work_subject("prov-b", ECHO),
            durable=subjects.work_consumer("prov-b", ECHO),
            stream=subjects.WORK_STREAM,
            config=consumer("prov-b", ECHO),
        )
        [msg] = await own.fetch(1, timeout=5)
        assert msg.data == b"prov-b/" + ECHO.encode()
        await msg.ack()
        for pool, model in ((POOL, OTHER), ("prov-a", ECHO), ("prov-b", OTHER)):
            durable = subjects.work_consumer(pool, model)
            with pytest.raises(nats.errors.TimeoutError):  # a pull request, as a worker's feed sends it
                await adapter.request(subjects.js_consumer_next(subjects.WORK_STREAM, durable), b"1", timeout=0.5)
        await adapter.flush()
        for _ in range(100):
            if sum("consumer.msg.next" in v for v in violations) >= 3:
                break
            await asyncio.sleep(0.05)
        for pool, model in ((POOL, OTHER), ("prov-a", ECHO), ("prov-b", OTHER)):
            durable = subjects.work_consumer(pool, model)
            next_subject = subjects.js_consumer_next(subjects.WORK_STREAM, durable).lower()
            assert f'permissions violation for publish to "{next_subject}"' in "\n".join(violations), violations
            info = await ojs.consumer_info(subjects.WORK_STREAM, durable)
            assert info.num_pending == 1 and info.num_ack_pending == 0, (durable, info)  # still queued, untouched
    finally:
        await adapter.close()
