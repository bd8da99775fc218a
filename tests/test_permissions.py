"""A worker node's own NATS credentials: enough to serve its models, and nothing else. Each
denial is proven against a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from broker_api.embedded_nats import NatsServer
from schemas import subjects
from schemas.permissions import nats_user_block, worker_inbox, worker_permissions
from tests.conftest import ECHO
from tests.stack import Stack
from tests.test_faults import sdk

OTHER = "secret/model"


def auth_block() -> str:
    node = nats_user_block("w1", "w1-pw", worker_permissions("w1", "own", [ECHO]))
    return f'authorization {{ users = [ {{ user: "ops", password: "ops-pw" }}, {node} ] }}'


async def create_consumers(url: str) -> None:
    """The operator's side: the stream and each model's consumer exist before workers come."""
    ops = await nats.connect(url)
    js = ops.jetstream()
    await js.add_stream(name=subjects.WORK_STREAM, subjects=[subjects.WORK_ALL], retention="workqueue")
    for model in (ECHO, OTHER):
        await js.add_consumer(
            subjects.WORK_STREAM,
            ConsumerConfig(
                durable_name=subjects.work_consumer("own", model),
                filter_subject=subjects.work_subject("own", model),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=1.5,
                max_deliver=3,
                max_waiting=4096,
            ),
        )
    await ops.close()


@pytest.fixture
async def secured(tmp_path: Path) -> Stack:
    stack = Stack(tmp_path)
    stack.nats = NatsServer(tmp_path / "nats", sync_always=False, extra_config=auth_block()).start()
    stack.credentials = "ops:ops-pw"
    await create_consumers(stack.nats_url)
    try:
        yield stack
    finally:
        await stack.close()


async def test_a_node_with_its_own_credentials_serves_its_model(secured: Stack) -> None:
    assert secured.nats is not None
    secured.start_scheduler()
    secured.start_worker(
        TOKENYARD_NODE_ID="w1", TOKENYARD_NATS_URL=secured.nats.url.replace("nats://", "nats://w1:w1-pw@")
    )
    await secured.start_api()
    await secured.wait_for_model(ECHO)
    async with sdk(secured) as client:
        r = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "least privilege"}], max_tokens=2
        )
        assert r.choices[0].message.content == "least privilege"
        stream = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "s t"}], max_tokens=2, stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "s t"


async def test_a_node_is_denied_everything_else(secured: Stack) -> None:
    assert secured.nats is not None
    violations: list[str] = []

    async def on_error(e: Exception) -> None:
        violations.append(str(e))

    node = await nats.connect(
        secured.nats.url, user="w1", password="w1-pw", inbox_prefix=worker_inbox("w1"), error_cb=on_error
    )
    try:
        # allowed: its advert, events to a gateway, its own consumer
        await node.publish(subjects.fleet_heartbeat("w1"), b"")
        await node.publish(subjects.reply_subject("gw", "job"), b"")
        psub = await node.jetstream().pull_subscribe(
            subjects.work_subject("own", ECHO), durable=subjects.work_consumer("own", ECHO), stream=subjects.WORK_STREAM
        )
        with pytest.raises(TimeoutError):  # nats' own or asyncio's: both are TimeoutError
            await psub.fetch(1, timeout=0.3)  # empty queue: a timeout, not a denial
        await node.flush()
        assert violations == []
        denied_subscriptions = [
            subjects.WORK_ALL,
            "ty.reply.>",
            "_INBOX.>",
            subjects.node_control("w2"),
            subjects.FLEET_HEARTBEAT_ALL,
            "$KV.>",
        ]
        for subject in denied_subscriptions:
            await node.subscribe(subject)
        denied_publishes = [
            subjects.fleet_heartbeat("w2"),
            subjects.SCHED_SUBMIT,
            subjects.work_subject("own", ECHO),
            f"$JS.API.STREAM.INFO.{subjects.WORK_STREAM}",
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.WORK_STREAM}.{subjects.work_consumer('own', OTHER)}",
            f"$JS.API.DIRECT.GET.KV_{subjects.KEYS_BUCKET}",
            subjects.usage_subject("job"),
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
        with pytest.raises(nats.errors.Error):  # and another model's queue cannot be pulled
            other = await node.jetstream().pull_subscribe(
                subjects.work_subject("own", OTHER),
                durable=subjects.work_consumer("own", OTHER),
                stream=subjects.WORK_STREAM,
            )
            await other.fetch(1, timeout=0.5)
    finally:
        await node.close()
