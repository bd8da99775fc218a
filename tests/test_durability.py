"""A crash of NATS itself: jobs JetStream acknowledged survive a SIGKILL and restart of the
server (fsync on every write) and are served; nothing accepted is lost or left hanging."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai

from schemas import subjects
from tests.helpers import ECHO, sdk
from tests.stack import Stack


async def test_queued_job_survives_a_nats_crash(tmp_path: Path) -> None:
    stack = Stack(tmp_path, sync_always=True)
    stack.start_nats()
    stack.start_scheduler()
    stack.start_worker(TOKENYARD_SLOTS="1")
    try:
        await stack.start_api(request_timeout=40.0)
        await stack.wait_for_model(ECHO)
        async with sdk(stack, timeout=60) as client:
            busy = await client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "busy [[tokens=200]] [[rate=20]]"}], stream=True
            )
            first = await busy.__anext__()  # the worker's only slot is taken
            text = [first.choices[0].delta.content or ""] if first.choices else []
            queued = asyncio.create_task(
                client.chat.completions.create(
                    model=ECHO, messages=[{"role": "user", "content": "survivor [[tokens=3]]"}]
                )
            )
            js = (await stack.bus()).jetstream()
            deadline = time.monotonic() + 10
            while (await js.stream_info(subjects.WORK_STREAM)).state.messages < 2:
                assert time.monotonic() < deadline, "the second job was never queued"
                await asyncio.sleep(0.05)
            assert stack.nats is not None
            port = stack.nats.port
            stack.nats.kill()  # SIGKILL: no chance to flush anything
            await asyncio.sleep(0.5)
            stack.nats = stack.nats_server(port=port, sync_always=True).start()
            answer = await asyncio.wait_for(queued, 40)
            assert answer.choices[0].message.content == "survivor survivor survivor"
            # it was mid-stream when NATS died: it ends in an explicit error, or, where the
            # gateway and the worker were both back before the worker's next word, it comes
            # whole, every word once and in order (a gap would have been an error)
            try:
                async for chunk in busy:
                    text.extend(c.delta.content or "" for c in chunk.choices)
            except openai.APIError:
                pass
            else:
                assert "".join(text).split() == ["busy"] * 200
    finally:
        await stack.close()
