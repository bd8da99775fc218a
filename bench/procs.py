"""What the benchmarks read from the processes they start: CPU time, RSS, NATS message counts,
py-spy profiles, free ports. Shared by `stack_bench.py` and `peers.py`.

CPU and RSS come from psutil (user + system time of each process, resident set size); message
counts from nats-server's monitoring endpoint (`/connz`), per role by connection name.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def with_children(pid: int) -> list[int]:
    """A process and all its descendants (LiteLLM's proxy may fork workers)."""
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return [pid]


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    return {role: cpu_seconds(pid) for role, pid in pids.items()}


def nats_messages(monitor: str) -> dict[str, tuple[int, int]]:
    """Messages each role's connections sent to / got from nats-server (its monitoring port).
    A connection named `tokenyard-<role>-...` counts for <role>."""
    with urllib.request.urlopen(f"{monitor}/connz?limit=1024", timeout=5) as r:
        conns = json.loads(r.read())["connections"]
    out: dict[str, tuple[int, int]] = {}
    for c in conns:
        role = (c.get("name") or "other").removeprefix("tokenyard-").split("-")[0]
        sent, got = out.get(role, (0, 0))
        out[role] = (sent + c["in_msgs"], got + c["out_msgs"])  # the server's "in" is the client's sent
    return out


def per_request(after: Mapping[str, tuple[int, int]], before: Mapping[str, tuple[int, int]], n: int) -> dict:
    """NATS messages per request and role, [sent, received], from two `nats_messages` readings."""
    return {
        role: [round((v[i] - before.get(role, (0, 0))[i]) / max(n, 1), 2) for i in range(2)]
        for role, v in sorted(after.items())
    }


def spawn(module: str, env: Mapping[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python -m module args...`, its output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], env=dict(env), stdout=out, stderr=subprocess.STDOUT
        )


def stop_all(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM each (by PID), then wait; kill what does not stop in time."""
    procs = list(procs)
    for pr in procs:
        if pr.poll() is None:
            pr.terminate()
    for pr in procs:
        try:
            pr.wait(timeout)
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait(5)


def py_spy() -> Path:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit(f"py-spy not found next to {sys.executable}: pip install py-spy (the [bench] extra)")
    return spy


class Profiler:
    """py-spy on each named process while it runs: `out/<role>.folded` (raw folded stacks,
    flamegraph-ready; `bench/folded.py` summarises them)."""

    def __init__(self, out: Path, pids: Mapping[str, int], *, rate: int = 500) -> None:
        self.out = out
        self.pids = dict(pids)
        self.rate = rate
        self._spies: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Profiler:
        self.out.mkdir(parents=True, exist_ok=True)
        spy = py_spy()
        for role, pid in self.pids.items():
            cmd = [str(spy), "record", "--format", "raw", "--rate", str(self.rate), "--nonblocking"]
            cmd += ["-o", str(self.out / f"{role}.folded"), "-p", str(pid)]
            self._spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # py-spy needs a moment to attach
        return self

    def __exit__(self, *exc: object) -> None:
        for spy in self._spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in self._spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
