"""How far behind the gateway's loop ran (`broker_api.lag`), measured on a real event loop
blocked the way a busy gateway's is: by a call that does not yield."""

from __future__ import annotations

import asyncio
import contextlib
import time

from broker_api.lag import LoopLag


async def test_a_blocked_loop_counts_as_behind_from_when_it_was_blocked() -> None:
    lag = LoopLag(period=0.02)
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.2)
        before = time.monotonic()
        assert lag.behind_since(before, before) < 0.2  # a loop that keeps up (margins: a loaded machine)
        time.sleep(0.6)  # blocked: nothing of this loop runs
        # asked in the first turn after the block, before the monitor ran again: the overdue
        # wake-up counts already
        assert 0.5 <= lag.behind_since(before, time.monotonic()) <= 0.8
        await asyncio.sleep(0.1)
        now = time.monotonic()
        assert 0.5 <= lag.behind_since(before, now) <= 0.8  # now as a wake-up it recorded
        assert lag.behind_since(now, now) < 0.2  # what came before `t` does not count
        assert lag.behind_since(before + 0.3, now) <= 0.45  # only the part of the block after `t`
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
