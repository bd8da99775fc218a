"""Process hygiene (issue 11, case 11): a scheduler exits soon after SIGTERM, also under load;
the children of a killed `tokenyard up` do not outlive it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import nats
import openai

from schemas.jobs import Submission
from schemas.tenancy import Limits
from tests.helpers import CLI, ECHO, FakeNodes, job, node, publish_usage, submit
from tests.stack import Stack, free_port

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
    nc = await stack.connect()
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


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if fields[0] != "Z":
                    parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def _up(data: Path, port: int, nats_port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*CLI, "up", "--backend", "echo", "--port", str(port), "--nats-port", str(nats_port)]
            + ["--data-dir", str(data)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENYARD_ADMIN_KEY": "", "TOKENYARD_LOG_LEVEL": "warning"},
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count("Tokenyard is up") > 0 and proc.poll() is None:
            return proc
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        await asyncio.sleep(0.2)
    raise AssertionError(log.read_text(errors="replace")[-3000:])


async def test_children_of_a_killed_launcher_end_and_the_next_up_starts(tmp_path: Path) -> None:
    """`tokenyard up` SIGKILLed: nats-server, the scheduler, the API and the worker all end
    within a few seconds (issue 11, case 11d), and a second `up` on the same ports starts."""
    port, nats_port = free_port(), free_port()
    first = await _up(tmp_path / "data", port, nats_port, tmp_path / "up-1.log")
    children = _descendants(first.pid)
    assert len(children) >= 4, children  # nats-server, scheduler, api, worker (and the guard)
    first.kill()
    first.wait(5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        await asyncio.sleep(0.1)
    left = [pid for pid in children if _alive(pid)]
    assert not left, f"still running after the launcher was killed: {left}"
    second = await _up(tmp_path / "data", port, nats_port, tmp_path / "up-2.log")
    children = _descendants(second.pid)
    try:
        key = (tmp_path / "data" / "admin_key").read_text().strip()
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as c:
            r = await c.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "up again"}], max_tokens=2
            )
        assert r.choices[0].message.content == "up again"
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(60)
        except subprocess.TimeoutExpired:
            second.kill()
    assert second.returncode == 0  # a clean stop
    deadline = time.monotonic() + 10  # the guard ends once the launcher is gone
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        await asyncio.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)]
