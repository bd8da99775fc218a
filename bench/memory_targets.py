"""The memory targets of issue 15, run only when asked (they take long):

- `open_streams`: N streams open at once on one gateway, through the cloud adapter to an
  upstream that sends each chunk slowly (the stream lasts `--hold` seconds), opened at
  `--open-rate` per second; the gateway's RSS (and every role's) while they are open. Target:
  10,000 under 1.5 GB.
- `soak`: N requests (half plain, half streamed, `--concurrency` at once) through the cloud
  adapter in 20 blocks, the RSS of each role sampled after every block; start (after the first
  block, the warm-up), end, max and drift. Target: flat within 5 % over 200,000 requests. A
  request not ended within 10 s counts as hung (each block waits for its hung requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from bench.loadgen import chat_body, run_cell
from bench.peer_systems import Tokenyard, Upstream
from bench.procs import rss_mb
from bench.traced import growth

SOAK_TIMEOUT = 10.0  # seconds after which a soak request counts as hung


def nats_memory(monitor: str) -> dict[str, float]:
    """What nats-server says it holds: its own memory (MB), and JetStream's messages and bytes
    in memory and on disk (`/varz`, `/jsz`)."""
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as r:
        varz = json.loads(r.read())
    with urllib.request.urlopen(f"{monitor}/jsz", timeout=5) as r:
        jsz = json.loads(r.read())
    return {
        "nats_mem_mb": varz.get("mem", 0) / 1e6,
        "js_messages": jsz.get("messages", 0),
        "js_store_mb": jsz.get("storage", 0) / 1e6,
        "js_memory_mb": jsz.get("memory", 0) / 1e6,
    }


async def snapshot(pid: int, folder: Path, n: int, timeout: float = 60.0) -> Path:
    """Ask a role run under `bench/traced.py` for its `n`-th snapshot; its path once written."""
    path = folder / f"{n:03d}.snap"
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc snapshot {path} within {timeout} s")
        await asyncio.sleep(0.2)
    return path


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children (the stack) inherit it
    return hard


class StreamCounts:
    def __init__(self) -> None:
        self.opened = self.open = self.peak_open = self.ended_ok = 0
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _hold_one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], c: StreamCounts, timeout: float
) -> None:
    counted = False
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, data=json.dumps(body).encode()) as r:
                if r.status != 200:
                    c.error(f"http {r.status}")
                    await r.read()
                    return
                done = False
                async for line in r.content:
                    if not counted and line.startswith(b"data:"):
                        counted = True
                        c.opened += 1
                        c.open += 1
                        c.peak_open = max(c.peak_open, c.open)
                    if line.startswith(b"data: [DONE]"):
                        done = True
                if done:
                    c.ended_ok += 1
                else:
                    c.error("no [DONE]")
    except TimeoutError:
        c.error("timeout")
    except aiohttp.ClientError as e:
        c.error(type(e).__name__)
    finally:
        if counted:
            c.open -= 1


async def open_streams(tmp: Path, a: argparse.Namespace) -> dict[str, Any]:
    n = a.open_streams
    limit = _raise_fd_limit()
    # Each chunk `delay` apart: the first one after `delay`, so a stream is open (headers sent,
    # its first byte out) for about `hold` seconds.
    events = a.tokens + 3  # role, tokens, finish, usage ([DONE] rides with the last)
    delay = a.hold / events
    upstream = Upstream(tmp, tokens=a.tokens, chunk_delay=delay)
    try:
        ty = Tokenyard(tmp, upstream, slots=n)
    except BaseException:
        upstream.stop()
        raise
    samples: list[dict[str, float]] = []
    counts = StreamCounts()
    try:
        url = f"{ty.base_url}/chat/completions"
        connector = aiohttp.TCPConnector(limit=n + 10, ttl_dns_cache=None)
        headers = {"Authorization": f"Bearer {ty.key}", "Content-Type": "application/json"}
        started = time.monotonic()
        rss0 = {role: rss_mb(pid) for role, pid in ty.pids.items()}
        async with aiohttp.ClientSession(
            connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=None)
        ) as s:
            tasks: list[asyncio.Task[None]] = []

            async def sampler() -> None:
                while True:
                    samples.append(
                        {"t": time.monotonic() - started, "open": counts.open, "load": os.getloadavg()[0]}
                        | {role: rss_mb(pid) for role, pid in ty.pids.items()}
                    )
                    print(f"# open-streams: {samples[-1]}", file=sys.stderr, flush=True)
                    await asyncio.sleep(2.0)

            watch = asyncio.create_task(sampler())
            for i in range(n):
                body = chat_body(ty.model, True, a.tokens, i)
                tasks.append(asyncio.create_task(_hold_one(s, url, body, counts, a.hold * 3 + 60)))
                await asyncio.sleep(1 / a.open_rate)
            await asyncio.gather(*tasks)
            watch.cancel()
        peak = max(samples, key=lambda x: (x["open"], x.get("api", 0)))
        return {
            "open_streams": n,
            "fd_limit": limit,
            "hold_s": a.hold,
            "chunk_delay_s": delay,
            "peak_open": counts.peak_open,
            "ended_ok": counts.ended_ok,
            "errors": counts.errors,
            "rss_mb_at_start": rss0,
            "rss_mb_at_peak_open": peak,
            "rss_mb_max": {role: max(x[role] for x in samples) for role in ty.pids},
            "samples": samples,
        }
    finally:
        ty.stop()
        upstream.stop()


async def soak(tmp: Path, a: argparse.Namespace) -> dict[str, Any]:
    upstream = Upstream(tmp, tokens=a.tokens)
    try:
        ty = Tokenyard(tmp, upstream, traced=a.trace_memory or "")
    except BaseException:
        upstream.stop()
        raise
    block = max(1000, min(20_000, a.soak // 20))
    snaps: list[Path] = []
    samples: list[dict[str, float]] = []
    errors: dict[str, int] = {}
    done = 0
    deadline = time.monotonic() + a.soak_seconds
    try:
        while done < a.soak and time.monotonic() < deadline:
            stream = (done // block) % 2 == 1
            cell = await run_cell(
                ty.base_url,
                ty.key,
                ty.model,
                stream=stream,
                tokens=a.tokens,
                requests=min(block, a.soak - done),
                concurrency=a.concurrency,
                seconds=max(deadline - time.monotonic(), 1.0),
                timeout=SOAK_TIMEOUT,  # each block waits for its hung requests: keep that short
                warmup=0,
            )
            done += len(cell.samples)
            for kind, k in cell.errors().items():
                errors[kind] = errors.get(kind, 0) + k
            samples.append(
                {"requests": done, "rps": len(cell.samples) / cell.wall, "load": os.getloadavg()[0]}
                | {role: rss_mb(pid) for role, pid in ty.pids.items()}
                | nats_memory(ty.monitor)
            )
            if a.trace_memory:
                snaps.append(await snapshot(ty.pids[a.trace_memory], ty.trace_dir, len(snaps)))
            print(f"# soak: {samples[-1]}", file=sys.stderr, flush=True)
        first, last = samples[0], samples[-1]
        roles = {
            role: {
                "start_mb": first[role],
                "end_mb": last[role],
                "max_mb": max(x[role] for x in samples),
                "drift_pct": 100 * (last[role] - first[role]) / first[role],
            }
            for role in ty.pids
        }
        for role, r in roles.items():
            print(
                f"- {role}: start {r['start_mb']:.1f} MB, end {r['end_mb']:.1f} MB, max {r['max_mb']:.1f} MB, "
                f"drift {r['drift_pct']:+.1f} %"
            )
        print(f"# {done} requests in blocks of {block}; errors {errors or 0}")
        grown = growth(snaps[0], snaps[-1]) if len(snaps) > 1 else []
        if grown:
            print(f"# what grew in the {a.trace_memory} (tracemalloc):", *grown, sep="\n")
        report = {"soak": a.soak, "requests": done, "block": block, "roles": roles, "errors": errors}
        return report | {"samples": samples, "traced": {"role": a.trace_memory, "growth": grown}}
    finally:
        ty.stop()
        upstream.stop()
