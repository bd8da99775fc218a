"""Process hygiene (issue 11, case 11): a scheduler exits soon after SIGTERM, also under load."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import nats

from schemas.jobs import Submission
from schemas.tenancy import Limits
from tests.stack import Stack
from tests.test_scheduler_limits import FakeNodes, job, node, publish_usage, submit

EXIT_WITHIN = 3.0


async def _load(nc: nats.NATS, round_: int, stop: asyncio.Event) -> None:
    """Limited submissions 20 at a time, and a usage record for each admitted one."""
    i = 0
    while not stop.is_set():
        subs = [
            Submission(
                job=job(f"r{round_}-{i}-{k}"), tenant="org", key_id="key", key_limits=Limits(rpm=10**6, tpm=10**9)
            )
            for k in range(20)
        ]
        i += 1
        answers = await asyncio.gather(*(submit(nc, s, timeout=1.0) for s in subs), return_exceptions=True)
        for s, a in zip(subs, answers):
            if not isinstance(a, BaseException) and a.error is None:
                with contextlib.suppress(Exception):
                    await publish_usage(nc, s.job.id, key="key", org="org", tokens=(3, 4), reserved=1)


async def test_a_scheduler_under_load_exits_within_3_s_of_sigterm(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.start_nats()
    nc = await nats.connect(stack.nats_url)
    nodes = await FakeNodes(nc, [node("n1", slots=1000)]).start()
    try:
        for round_ in range(3):
            scheduler = stack.start_scheduler()
            await stack.wait_for_scheduler()
            stop = asyncio.Event()
            load = asyncio.create_task(_load(nc, round_, stop))
            await asyncio.sleep(2.0)
            assert not load.done(), load.exception()
            sent = time.monotonic()
            scheduler.signal(signal.SIGTERM)
            while scheduler.alive() and time.monotonic() - sent < 15:
                await asyncio.sleep(0.05)
            took = time.monotonic() - sent
            stop.set()
            await load
            assert not scheduler.alive(), f"round {round_}: still running {took:.1f} s after SIGTERM"
            assert took <= EXIT_WITHIN, f"round {round_}: exited {took:.1f} s after SIGTERM"
            assert scheduler.popen.returncode == 0, scheduler.output()[-3000:]
    finally:
        await nodes.stop()
        await nc.close()
        await stack.close()
