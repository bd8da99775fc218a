"""A scheduler that has just started knows no node yet: a request for a served model waits for
the node's advert instead of being told the model does not exist.

The long chaos run at load ~20 (RESULTS section 9, run 7) had a restarted scheduler answer
404 model_not_found for `tokenyard/echo` 0.53 s after it started: its wait for the roll call's
answers (0.5 s, counted from before it even served) had run out. Here the only worker answers
late because it is stopped (SIGSTOP) across the scheduler's restart."""

from __future__ import annotations

import asyncio
import signal

from tests.helpers import ECHO, sdk
from tests.stack import Stack


async def test_a_restarted_scheduler_waits_for_a_late_node_instead_of_a_404(stack: Stack) -> None:
    worker = stack.start_worker()
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    worker.signal(signal.SIGSTOP)
    try:
        for proc in [p for p in stack.procs if p.name == "scheduler"]:
            proc.kill()
        stack.start_scheduler()
        await stack.wait_for_scheduler()
        client = sdk(stack)
        asking = asyncio.create_task(
            client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "hello there"}])
        )
        await asyncio.sleep(1.0)  # past the old wait: the request is still waiting for the node
        assert not asking.done(), asking.exception() if asking.done() else None
    finally:
        worker.signal(signal.SIGCONT)
    answer = await asyncio.wait_for(asking, 30)
    assert (answer.choices[0].message.content or "").startswith("hello there")  # the echo of the prompt
