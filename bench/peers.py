"""What Tokenyard adds, side by side with the upstream alone and with the LiteLLM proxy.

One command starts, on 127.0.0.1: a fast fake OpenAI-compatible upstream
(`bench/fast_upstream.py`), Tokenyard as a user runs it (nats-server with fsync on every write,
scheduler, API, one cloud-adapter worker forwarding to the upstream) and, with `--litellm`, the
LiteLLM proxy (in its own venv under `bench/.peers/`, made on first use) forwarding to the same
upstream. Then it measures each system with an aiohttp load generator (`bench/loadgen.py`):
plain and streamed answers of `--tokens` tokens, 1 at a time and `--concurrency` at once, each
cell `--repeat` times, the systems interleaved cell by cell so they see the same machine:
requests/s, p50/p99 latency and what it adds to the upstream alone, TTFT and gaps between
chunks of streams, errors (a request not ended within `--timeout` is an error: a hung stream),
CPU per request summed over every process of the system (nats-server included for
Tokenyard), RSS per process, and NATS messages per request per Tokenyard role.

    .venv/bin/python bench/peers.py --litellm --repeat 3 --json /tmp/peers.json
    .venv/bin/python bench/peers.py --only tokenyard --profile /tmp/peers-profile
    .venv/bin/python bench/peers.py --open-streams 10000     # gateway RSS with 10,000 open streams
    .venv/bin/python bench/peers.py --soak 200000            # RSS drift over 200,000 requests
    .venv/bin/python bench/peers.py --soak 60000 --trace-memory scheduler   # ... and what grew (tracemalloc)

Numbers move with whatever else runs on the machine: the load average is recorded with each cell.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peer_report  # noqa: E402
from bench.folded import render, summarize  # noqa: E402
from bench.loadgen import run_cell  # noqa: E402
from bench.memory_targets import open_streams, soak  # noqa: E402
from bench.peer_systems import ECHO_MODEL, LiteLLM, Tokenyard, Upstream  # noqa: E402
from bench.procs import Profiler, cpu_snapshot, nats_messages, per_request, rss_mb  # noqa: E402

SYSTEMS = ("upstream", "tokenyard", "echo", "litellm")


class Target:
    """One measured system: where to send, what counts for its CPU."""

    def __init__(self, name: str, base_url: str, key: str, model: str, pids: dict[str, int], **extra: Any) -> None:
        self.name, self.base_url, self.key, self.model, self.pids = name, base_url, key, model, pids
        self.monitor: str | None = extra.get("monitor")
        self.expected: str | None = extra.get("expected", "")
        self.info: dict[str, Any] = extra.get("info", {})


async def measure(t: Target, upstream_pid: int, *, stream: bool, concurrency: int, a: argparse.Namespace) -> dict:
    watched = {**t.pids, "_upstream": upstream_pid}
    cpu0 = cpu_snapshot(watched)
    msgs0 = nats_messages(t.monitor) if t.monitor else {}
    load = os.getloadavg()[0]
    after: dict[str, Any] = {}

    def lanes_done() -> None:  # before the wait for stuck requests: idle time must not count
        after["cpu"] = cpu_snapshot(watched)
        after["rss"] = {role: rss_mb(pid) for role, pid in t.pids.items()}
        if t.monitor:
            after["msgs"] = nats_messages(t.monitor)

    cell = await run_cell(
        t.base_url,
        t.key,
        t.model,
        stream=stream,
        tokens=a.tokens,
        requests=a.requests,
        concurrency=concurrency,
        seconds=a.seconds,
        min_seconds=a.min_seconds,
        timeout=a.timeout,
        stuck=a.stuck,
        expected=t.expected,
        on_lanes_done=lanes_done,
    )
    n = max(len(cell.samples), 1)
    cpu = {role: (after["cpu"][role] - cpu0[role]) / n * 1e3 for role in watched}
    upstream_cpu = cpu.pop("_upstream")
    result = peer_report.cell_metrics(cell)
    result.update(
        load=load,
        cpu_ms_per_req=sum(cpu.values()),
        cpu_ms_per_req_by_process=cpu,
        upstream_cpu_ms_per_req=upstream_cpu if t.name != "upstream" else 0.0,
        client_cpu_ms_per_req=cell.client_cpu / n * 1e3,
        client_cpu_share=cell.client_cpu / cell.wall if cell.wall else 0.0,
        rss_mb=after["rss"],
    )
    if t.monitor:
        result["nats_msgs_per_req"] = per_request(after["msgs"], msgs0, n)
    return result


def cells(concurrency: int) -> list[tuple[str, bool, int]]:
    return [
        ("plain, 1 at a time", False, 1),
        (f"plain, {concurrency} at once", False, concurrency),
        ("stream, 1 at a time", True, 1),
        (f"stream, {concurrency} at once", True, concurrency),
    ]


async def run_matrix(targets: list[Target], upstream_pid: int, a: argparse.Namespace) -> dict[str, dict[str, list]]:
    runs: dict[str, dict[str, list]] = {}
    for rep in range(a.repeat):
        for name, stream, conc in cells(a.concurrency):
            for t in targets:
                r = await measure(t, upstream_pid, stream=stream, concurrency=conc, a=a)
                runs.setdefault(name, {}).setdefault(t.name, []).append(r)
                print(f"# rep {rep + 1} | {name} | {t.name}: {peer_report.one_line(r)}", file=sys.stderr, flush=True)
    return runs


async def run_profiles(t: Target, upstream_pid: int, a: argparse.Namespace) -> dict:
    """Each cell once more for Tokenyard under py-spy (kept out of the table: sampling costs CPU)."""
    out: dict[str, Any] = {}
    python_roles = {role: pid for role, pid in t.pids.items() if role != "nats-server"}
    for name, stream, conc in cells(a.concurrency):
        folder = a.profile / f"{'stream' if stream else 'plain'}-{conc}"
        with Profiler(folder, python_roles):
            r = await measure(t, upstream_pid, stream=stream, concurrency=conc, a=a)
        out[name] = {"run": r, "profiles": {}}
        for role in python_roles:
            path = folder / f"{role}.folded"
            if path.exists():
                s = summarize(path)
                out[name]["profiles"][role] = s
                print(render(f"{name} / {role} ({path})", s))
    return out


def start_targets(tmp: Path, upstream: Upstream, a: argparse.Namespace, stack: list[Any]) -> list[Target]:
    wanted = set(a.only or SYSTEMS) - (set() if a.litellm or "litellm" in (a.only or ()) else {"litellm"})
    wanted -= set() if a.echo or "echo" in (a.only or ()) else {"echo"}
    targets = []
    if "upstream" in wanted:
        targets.append(Target("upstream", upstream.base_url, upstream.key, upstream.model, upstream.pids))
    if wanted & {"tokenyard", "echo"}:
        ty = Tokenyard(tmp, upstream, echo="echo" in wanted, tokens=a.tokens, fsync=a.fsync)
        stack.append(ty)
        core = {r: p for r, p in ty.pids.items() if r in {"nats-server", "scheduler", "api"}}
        if "tokenyard" in wanted:
            pids = {**core, "worker": ty.pids["worker"]}
            targets.append(Target("tokenyard", ty.base_url, ty.key, ty.model, pids, monitor=ty.monitor))
        if "echo" in wanted:
            pids = {**core, "echo": ty.pids["echo"]}
            targets.append(Target("echo", ty.base_url, ty.key, ECHO_MODEL, pids, monitor=ty.monitor, expected=None))
    if "litellm" in wanted:
        try:
            lite = LiteLLM(tmp, upstream)
        except RuntimeError as e:
            print(f"# LiteLLM is left out: {e}", file=sys.stderr, flush=True)
        else:
            stack.append(lite)
            targets.append(
                Target("litellm", lite.base_url, lite.key, lite.model, lite.pids, info={"version": lite.version})
            )
    return targets


async def main(a: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="tokenyard-peers-"))
    started = time.time()
    if a.open_streams:
        report = await open_streams(tmp, a)
    elif a.soak:
        report = await soak(tmp, a)
    else:
        report = await compare(tmp, a)
    report.update(command=" ".join(["bench/peers.py", *sys.argv[1:]]), started=started, tmp=str(tmp))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"# JSON written to {a.json}", file=sys.stderr)
    return 0


async def compare(tmp: Path, a: argparse.Namespace) -> dict:
    upstream = Upstream(tmp, tokens=a.tokens, server=a.upstream_server)
    stack: list[Any] = [upstream]
    try:
        targets = start_targets(tmp, upstream, a, stack)
        load0 = os.getloadavg()
        runs = await run_matrix(targets, upstream.proc.pid, a)
        profiles = {}
        if a.profile:
            ty = next((t for t in targets if t.name == "tokenyard"), None)
            if ty is not None:
                profiles = await run_profiles(ty, upstream.proc.pid, a)
        summary = peer_report.summarize_runs(runs)
        info = {t.name: t.info for t in targets if t.info}
        print(peer_report.render(summary, runs, a, load0, info))
        return {"summary": summary, "runs": runs, "profiles": profiles, "info": info, "load_at_start": load0}
    finally:
        for s in reversed(stack):
            s.stop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests per cell and run (at most)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per cell and run (at most)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="seconds per cell and run (at least)")
    p.add_argument("--concurrency", type=int, default=32, help="clients at once in the loaded cells")
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--repeat", type=int, default=1, help="runs of each cell (the table shows median and range)")
    p.add_argument("--timeout", type=float, default=60.0, help="a request not ended by then is an error (hung)")
    p.add_argument("--stuck", type=float, default=5.0, help="a request going this long no longer holds its client")
    p.add_argument("--only", action="append", choices=SYSTEMS, help="measure only these systems (repeatable)")
    p.add_argument("--litellm", action="store_true", help="also the LiteLLM proxy (installed on first use)")
    p.add_argument("--echo", action="store_true", help="also Tokenyard's echo backend (the path without the adapter)")
    p.add_argument(
        "--fsync", action=argparse.BooleanOptionalAction, default=True, help="JetStream fsyncs every write (default)"
    )
    p.add_argument("--upstream-server", choices=("raw", "aiohttp"), default="raw", help="the fake upstream's server")
    p.add_argument("--profile", type=Path, metavar="DIR", help="then each cell once more under py-spy; stacks to DIR")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every run and the summary here")
    p.add_argument("--open-streams", type=int, default=0, metavar="N", help="only: N open streams, gateway RSS")
    p.add_argument("--hold", type=float, default=120.0, help="--open-streams: seconds each stream stays open")
    p.add_argument("--open-rate", type=float, default=400.0, help="--open-streams: new streams per second")
    p.add_argument("--soak", type=int, default=0, metavar="N", help="only: RSS of each role over N requests")
    p.add_argument("--soak-seconds", type=float, default=3600.0, help="--soak: at most this long")
    p.add_argument(
        "--trace-memory",
        choices=("scheduler", "api", "worker"),
        help="--soak: run this role under tracemalloc and print what grew (bench/traced.py)",
    )
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(main(args)))
    sys.exit(uvloop.run(main(args)))
