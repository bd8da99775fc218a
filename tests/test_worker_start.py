"""A worker started while JetStream does not answer waits for it instead of exiting.

Three clean-checkout CI runs lost a job so (`tests/test_gateway_death.py`, killed_together): a
worker started while a NATS node of three was down found its stream between leaders, its
consumer look-up timed out, and the process ended, so nobody took the job's message again or
reported it. Here the same look-up finds no responder at all: the worker is started against a
nats-server on the stack's port with JetStream off, which is then replaced by the stack's own
server (its streams kept); the worker must then serve."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from broker_api.embedded_nats import NatsServer
from tests.helpers import ECHO, sdk
from tests.stack import Stack


class WithoutJetStream(NatsServer):
    """A nats-server like the stack's (its port, its accounts) whose JetStream API nobody answers."""

    def config_text(self) -> str:
        text, gone = re.subn(r"jetstream \{[^}]*\}\n", "", super().config_text())
        assert gone == 1, text
        return text


async def test_a_worker_started_while_jetstream_does_not_answer_waits_for_it(stack: Stack) -> None:
    await stack.start_api()
    await stack.wait_for_scheduler()  # the work stream exists from here on
    assert stack.nats is not None
    port = stack.nats.port
    stack.nats.stop()
    plain = WithoutJetStream(stack.tmp / "plain", port=port, auth=stack.auth.conf_path if stack.auth else None)
    plain.start()
    try:
        worker = stack.start_worker(TOKENYARD_LOG_LEVEL="info")
        deadline = time.monotonic() + 30
        while "worker.waiting_for_stream_leader" not in worker.output():
            assert worker.alive(), f"the worker ended:\n{worker.output()[-3000:]}"
            assert time.monotonic() < deadline, worker.output()[-3000:]
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # asked again a few times, and still there
        assert worker.alive(), f"the worker ended:\n{worker.output()[-3000:]}"
    finally:
        plain.stop()
    stack.nats = stack.nats_server(port=port).start()
    await stack.wait_for_model(ECHO, timeout=60)
    async with sdk(stack) as client:
        answer = await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "still here"}])
    assert (answer.choices[0].message.content or "").startswith("still here")
    assert worker.alive()


pytestmark = pytest.mark.timeout(180)
