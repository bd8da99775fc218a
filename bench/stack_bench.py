"""Through-the-stack cost of a request versus the backend's own cost.

Starts nats-server, a scheduler, an echo worker and the API as separate processes on
127.0.0.1, then sends chat completions with an HTTP client from this process:

- one at a time (latency p50/p99), plain and streamed;
- `--concurrency` at once (requests/s);

and reads the CPU time every Tokenyard process and nats-server spent (from /proc), per
request. The same requests are then run against the echo backend in-process, without
NATS or HTTP: the difference is what Tokenyard adds.

    .venv/bin/python bench/stack_bench.py --requests 2000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import Profiler, cpu_seconds, nats_messages, pct, per_request, spawn, stop_all  # noqa: E402
from broker_api.embedded_nats import NatsServer  # noqa: E402
from worker.echo import EchoBackend  # noqa: E402

KEY = "ty_admin_bench-key-0123456789abcdef"
MODEL = "tokenyard/echo"


def body(tokens: int, stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"the quick brown fox [[tokens={tokens}]]"}],
        "stream": stream,
    }


async def one(http: httpx.AsyncClient, payload: dict) -> float:
    started = time.perf_counter()
    if payload["stream"]:
        async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
            assert r.status_code == 200, await r.aread()
            async for _ in r.aiter_bytes():
                pass
    else:
        r = await http.post("/v1/chat/completions", json=payload)
        assert r.status_code == 200, r.text
    return time.perf_counter() - started


async def run_load(url: str, payload: dict, n: int, concurrency: int, pids: list[int], monitor: str) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=60
    ) as http:
        for _ in range(min(50, n)):  # warm-up
            await one(http, payload)
        cpu0s = [cpu_seconds(p) for p in pids]
        msgs0 = nats_messages(monitor)
        latencies: list[float] = []
        queue = list(range(n))
        started = time.perf_counter()

        async def lane() -> None:
            while queue:
                queue.pop()
                latencies.append(await one(http, payload))

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpus = [cpu_seconds(p) - c for p, c in zip(pids, cpu0s)]
        cpu = sum(cpus)
        msgs = per_request(nats_messages(monitor), msgs0, n)
    return {
        "per_process_ms": [round(c / n * 1e3, 3) for c in cpus],
        "requests": n,
        "concurrency": concurrency,
        "rps": n / wall,
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
        "cpu_ms_per_req": cpu / n * 1e3,
        "nats_msgs_per_req": msgs,
    }


async def backend_alone(payload: dict, n: int) -> dict:
    backend = EchoBackend(models=(MODEL,), slots=64, tokens=16, rate=0, context=4096)
    request = {k: v for k, v in payload.items() if k != "stream"}
    latencies = []
    cpu0 = time.process_time()
    for _ in range(n):
        started = time.perf_counter()
        backend.check(MODEL, request)
        async for _ in backend.generate(MODEL, request):
            pass
        latencies.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu0
    return {
        "requests": n,
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
        "cpu_ms_per_req": cpu / n * 1e3,
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="clients at once (httpx in this one process stops keeping up near 32)",
    )
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--sync-always", action="store_true", help="fsync every JetStream write (the `up` default)")
    p.add_argument("--no-ledger", action="store_true", help="run the API without its local ledger")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample each Tokenyard process with py-spy during the runs; folded stacks go to DIR",
    )
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokenyard-bench-"))
    port = 18000 + os.getpid() % 1000
    monitor_port = port + 1000
    nats_server = NatsServer(
        tmp / "nats", sync_always=a.sync_always, extra_config=f"http: 127.0.0.1:{monitor_port}"
    ).start()
    monitor = f"http://127.0.0.1:{monitor_port}"
    env = {
        **os.environ,
        "TOKENYARD_NATS_URL": nats_server.url,
        "TOKENYARD_LOG_LEVEL": "warning",
        "TOKENYARD_ADMIN_KEY": KEY,
        "TOKENYARD_BACKEND": "echo",
        "TOKENYARD_DATA_DIR": str(tmp),
    }
    procs = [
        spawn("scheduler", env, tmp / "scheduler.log"),
        spawn("worker", env, tmp / "worker.log", "--slots", "256", "--echo-tokens", str(a.tokens)),
        spawn("broker_api", env, tmp / "api.log", "--port", str(port), *(["--no-ledger"] if a.no_ledger else [])),
    ]
    pids = [nats_server.pid] + [pr.pid for pr in procs]
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for _ in range(200):
                try:
                    if (await http.get("/v1/models")).json().get("data"):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.1)
        results = {}
        with contextlib.ExitStack() as spies:
            if a.profile:
                roles = dict(zip(("scheduler", "worker", "api"), (pr.pid for pr in procs)))
                spies.enter_context(Profiler(a.profile, roles, rate=1000))
            for stream in (False, True):
                kind = "stream" if stream else "plain"
                payload = body(a.tokens, stream)
                results[f"{kind}, 1 at a time"] = await run_load(url, payload, min(a.requests, 1000), 1, pids, monitor)
                results[f"{kind}, {a.concurrency} at once"] = await run_load(
                    url, payload, a.requests, a.concurrency, pids, monitor
                )
        results["echo backend alone"] = await backend_alone(body(a.tokens, False), a.requests)
        print(f"# {' '.join(sys.argv)}  (sync_always={a.sync_always}, tokens={a.tokens}, ledger={not a.no_ledger})")
        print("# CPU per process (ms/request): nats-server, scheduler, worker, api")
        print("| run | req/s | p50 ms | p99 ms | CPU ms/req (all processes) | nats / sched / worker / api |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            split = " / ".join(f"{c:.2f}" for c in r.get("per_process_ms", []))
            print(
                f"| {name} | {r.get('rps', float('nan')):.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['cpu_ms_per_req']:.3f} | {split} |"
            )
        print("# NATS messages per request, sent / received by each role's connections")
        for name, r in results.items():
            if "nats_msgs_per_req" in r:
                print(
                    f"#   {name}: " + ", ".join(f"{role} {s} / {g}" for role, (s, g) in r["nats_msgs_per_req"].items())
                )
        print(json.dumps(results))
    finally:
        stop_all(procs)
        nats_server.stop()


if __name__ == "__main__":
    asyncio.run(main())
