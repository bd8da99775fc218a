"""A simulated fleet against real schedulers: admission, fair release and placement at scale.

Starts a real nats-server and `--schedulers` real scheduler processes. This one asyncio process
then plays the rest:

- `--nodes` simulated worker nodes (advert publishers, not processes) in several pools of three
  kinds (own, volunteer, cloud) with mixed speeds, each advertising every second; every second
  `--churn` of them leave (drain: finish running jobs, take no new ones), a few are killed
  (their running jobs are never acked: JetStream redelivers them), and as many new ones join;
- per (pool, model), one puller that pulls jobs from the real work queue for the pool's free
  simulated slots, "runs" each on a node for tokens / node speed, acks it and publishes a usage
  record (so settlement and route statistics run as in production);
- `--tenants` tenants in three priority tiers submitting Poisson arrivals (core requests to the
  schedulers, standing in for gateways), plus two flooding tenants offering 10x, at
  `--overload` times the fleet's capacity for `--seconds`; then the queues drain;
- finally a burst of `--burst` submissions as fast as the schedulers answer.

With `--cluster` NATS is a three-node JetStream cluster on loopback (each node its own store,
routes between them) and every stream and bucket the schedulers make has three replicas, as in
production; the simulator and each scheduler connect to all three.

Reports scheduler decisions per second, queue wait (admission -> a node pulls it) p50/p99 per
tier, Jain's fairness index across tenants of a tier, jobs lost (admitted, never completed)
and run twice, and the CPU of each scheduler and each NATS server (also per 1,000 nodes).

    .venv/bin/python bench/fleet_sim.py --nodes 1000 --seconds 30
    .venv/bin/python bench/fleet_sim.py --nodes 1000 --seconds 20 --cluster
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_api.embedded_nats import NatsServer, cluster_config  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.jobs import Admission, Job, ModelAdvert, NodeAdvert, Submission  # noqa: E402
from schemas.tenancy import Limits  # noqa: E402
from schemas.usage import UsageRecord  # noqa: E402

MODELS = ("sim/small", "sim/large")
POOLS = {  # pool -> (kind, share of nodes, input price, output price)
    "own-a": ("own", 0.25, 0.0, 0.0),
    "own-b": ("own", 0.25, 0.0, 0.0),
    "own-c": ("own", 0.15, 0.0, 0.0),
    "vol": ("volunteer", 0.15, 0.0, 0.0),
    "cloud-x": ("cloud", 0.10, 0.5, 1.5),
    "cloud-y": ("cloud", 0.10, 1.0, 3.0),
}
SPEEDS = (10.0, 20.0, 40.0)  # tokens/s of a simulated node
TIERS = (("interactive", 0.2), ("standard", 0.5), ("batch", 0.3))
ACK_WAIT = 10.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def jain(xs: list[float]) -> float:
    return (sum(xs) ** 2) / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else float("nan")


@dataclass
class Node:
    id: str
    pool: str
    model: str
    slots: int
    speed: float
    running: int = 0
    leaving: bool = False
    dead: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def free(self) -> int:
        return 0 if self.leaving or self.dead else self.slots - self.running

    def advert(self) -> NodeAdvert:
        kind, _, pin, pout = POOLS[self.pool]
        return NodeAdvert(
            node=self.id,
            pool=self.pool,
            models=(ModelAdvert(self.model, 8192, "sim", pin, pout),),
            slots_total=self.slots,
            slots_free=max(0, self.free),
            draining=self.leaving,
            interval=1.0,
            kind=kind,
        )


@dataclass
class Tally:
    submitted: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # job -> (tenant, tier, t)
    admitted: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)
    started: dict[str, float] = field(default_factory=dict)  # job -> first pull time
    done: Counter[str] = field(default_factory=Counter)
    answers: list[float] = field(default_factory=list)  # answer times (decisions)


class Sim:
    def __init__(self, nc: NATS, args: argparse.Namespace) -> None:
        self.nc, self.js, self.a = nc, nc.jetstream(), args
        self.nodes: dict[str, Node] = {}
        self.ids = itertools.count()
        self.t = Tally()
        self.freed = asyncio.Event()
        self.rng = random.Random(args.seed)
        self.killed = self.left = self.joined = 0
        self.errors: Counter[str] = Counter()

    # --- fleet ------------------------------------------------------------------------------

    def add_node(self) -> Node:
        pools, weights = list(POOLS), [v[1] for v in POOLS.values()]
        pool = self.rng.choices(pools, weights)[0]
        n = Node(
            f"sim-{next(self.ids)}", pool, self.rng.choice(MODELS), self.rng.choice((1, 1, 2)), self.rng.choice(SPEEDS)
        )
        self.nodes[n.id] = n
        return n

    async def advertise_forever(self) -> None:
        while True:
            started = time.monotonic()
            for i, n in enumerate(list(self.nodes.values())):
                if not n.dead:
                    await self.nc.publish(subjects.fleet_heartbeat(n.id), n.advert().encode())
                if i % 100 == 99:
                    await asyncio.sleep(0.08)  # spread a second's adverts over the second
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    async def churn_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            live = [n for n in self.nodes.values() if not n.leaving and not n.dead]
            k = int(len(live) * self.a.churn)
            for n in self.rng.sample(live, min(k, len(live))):
                if self.rng.random() < 0.2:  # killed: running jobs are never acked
                    n.dead = True
                    self.killed += 1
                    for task in list(n.tasks):
                        task.cancel()
                    del self.nodes[n.id]
                else:
                    n.leaving = True
                    self.left += 1
                    if n.running == 0:
                        self.nodes.pop(n.id, None)
                self.add_node()
                self.joined += 1

    # --- pulling and running ----------------------------------------------------------------

    async def pull_forever(self, pool: str, model: str) -> None:
        config = ConsumerConfig(
            durable_name=subjects.work_consumer(pool, model),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_deliver=20,
            filter_subject=subjects.work_subject(pool, model),
            max_waiting=512,
        )
        psub = await self.js.pull_subscribe(
            config.filter_subject or "", durable=config.durable_name, stream=subjects.WORK_STREAM, config=config
        )
        while True:
            free = [n for n in self.nodes.values() if n.pool == pool and n.model == model and n.free > 0]
            slots = sum(n.free for n in free)
            if not slots:
                await asyncio.sleep(0.05)
                continue
            try:
                msgs = await psub.fetch(min(slots, 64), timeout=0.25)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as e:  # top of a loop: count it, keep pulling
                self.errors[type(e).__name__] += 1
                await asyncio.sleep(0.2)
                continue
            now = time.time()
            for msg in msgs:
                free = [n for n in free if n.free > 0] or [
                    n for n in self.nodes.values() if n.pool == pool and n.model == model and n.free > 0
                ]
                if not free:
                    await msg.nak()
                    continue
                node = self.rng.choice(free)
                job = Job.decode(msg.data)
                self.t.started.setdefault(job.id, now)
                node.running += 1
                task = asyncio.create_task(self.run(node, msg, job))
                node.tasks.add(task)
                task.add_done_callback(node.tasks.discard)

    async def run(self, node: Node, msg: Any, job: Job) -> None:
        tokens = int(job.request.get("sim_tokens", 100))
        duration = 0.2 + tokens / node.speed
        try:
            end = time.monotonic() + duration
            while (left := end - time.monotonic()) > 0:  # a worker keeps a long job its own
                await asyncio.sleep(min(left, ACK_WAIT / 3))
                if left > ACK_WAIT / 3:
                    await msg.in_progress()
            await msg.ack()
            self.t.done[job.id] += 1
            tenant = job.request.get("sim_tenant", "")
            record = UsageRecord(
                job_id=job.id,
                time=time.time(),
                org=tenant,
                project="",
                key_id=f"key-{tenant}",
                model=job.model,
                route=node.pool,
                node=node.id,
                attempts=1,
                prompt_tokens=20,
                completion_tokens=tokens,
                cached_tokens=0,
                cost=0.0,
                ttft_ms=200.0,
                duration_ms=duration * 1000,
                outcome="ok",
                reserved_tokens=int(job.request.get("sim_reserved", 0)),
            )
            if not self.a.no_usage:
                await self.nc.publish(subjects.usage_subject(job.id), record.encode(), headers={"Nats-Msg-Id": job.id})
        finally:
            node.running -= 1
            if node.leaving and node.running == 0:
                self.nodes.pop(node.id, None)

    # --- tenants ----------------------------------------------------------------------------

    async def submit(self, tenant: str, tier: str, tokens: int, limits: Limits, gate: asyncio.Semaphore) -> None:
        job_id = f"j{next(self.ids)}"
        model = self.rng.choice(MODELS)
        request = {
            "model": model,
            "messages": [],
            "sim_tokens": tokens,
            "sim_tenant": tenant,
            "sim_reserved": tokens + 20 if not limits.empty else 0,
        }
        job = Job(id=job_id, model=model, request=request, reply=f"ty.reply.sim.{job_id}", deadline=time.time() + 600)
        sub = Submission(
            job=job,
            tenant=tenant,
            key_id=f"key-{tenant}",
            priority=tier,
            key_limits=limits,
            org_limits=limits,
            estimated_tokens=tokens + 20,
            volunteer_ok=self.rng.random() < 0.5,
        )
        async with gate:
            self.t.submitted[job_id] = (tenant, tier, time.time())
            for _ in range(5):  # a gateway retries the same submission after a lost answer
                try:
                    reply = await self.nc.request(subjects.SCHED_SUBMIT, sub.encode(), timeout=5.0)
                    break
                except nats.errors.TimeoutError:
                    continue
            else:
                self.t.refused["timeout"] += 1
                return
        self.t.answers.append(time.time())
        answer = Admission.decode(reply.data)
        if answer.error is None:
            self.t.admitted.add(job_id)
        else:
            self.t.refused[str(answer.error.get("code"))] += 1
            del self.t.submitted[job_id]

    async def sequential(self, n: int, limits: Limits, pids: list[int]) -> dict[str, float]:
        """One admission at a time: the round trip a gateway waits, and scheduler CPU each."""
        gate = asyncio.Semaphore(1)
        times = []
        cpu0 = sum(cpu_seconds(p) for p in pids)
        for _ in range(n):
            started = time.perf_counter()
            await self.submit("seq", "interactive", 5, limits, gate)
            times.append(time.perf_counter() - started)
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        return {
            "p50_ms": round(1000 * pct(times, 0.5), 3),
            "p99_ms": round(1000 * pct(times, 0.99), 3),
            "scheduler_cpu_ms_each": round(1000 * cpu / max(n, 1), 3),
        }

    async def tenant(
        self,
        name: str,
        tier: str,
        rate: float,
        until: float,
        limits: Limits,
        gate: asyncio.Semaphore,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        while time.time() < until:
            await asyncio.sleep(self.rng.expovariate(rate))
            task = asyncio.create_task(self.submit(name, tier, self.rng.randint(40, 200), limits, gate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_nats(a: argparse.Namespace, tmp: Path) -> list[NatsServer]:
    """One nats-server, or with `--cluster` three clustered ones (fixed loopback ports)."""
    if not a.cluster:
        return [NatsServer(tmp / "nats", sync_always=a.sync_always).start()]
    clients, routes = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    return [
        NatsServer(
            tmp / f"n{i + 1}",
            port=clients[i],
            sync_always=a.sync_always,
            extra_config=cluster_config(
                server_name=f"n{i + 1}", cluster_name="fleet-sim", route_port=routes[i], route_ports=routes
            ),
        ).start()
        for i in range(3)
    ]


async def wait_for_jetstream(nc: NATS, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = await nc.request(subjects.JS_API_INFO, b"", timeout=1.0)
            if "error" not in json.loads(reply.data):
                return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("JetStream has no leader")


def capacity(nodes: dict[str, Node]) -> float:
    """Jobs per second the fleet can run (mean job: 0.2 s + 120 tokens at the node's speed)."""
    return sum(n.slots / (0.2 + 120 / n.speed) for n in nodes.values())


async def main(a: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    servers = start_nats(a, tmp)
    url = ",".join(server.url for server in servers)
    env = {
        **os.environ,
        "TOKENYARD_NATS_URL": url,
        "TOKENYARD_REPLICAS": "0",  # follow the cluster: three replicas of everything on --cluster
        "TOKENYARD_LOG_LEVEL": os.environ.get("SIM_SCHED_LOG", "warning"),
    }
    profile = ["-m", "cProfile", "-o", str(tmp / "sched{i}.prof")] if a.profile else []
    scheds = [
        subprocess.Popen(
            [sys.executable, *[x.format(i=i) for x in profile], "-m", "scheduler"],
            env=env,
            stdout=open(tmp / f"sched{i}.log", "wb"),
            stderr=subprocess.STDOUT,
            cwd=a.scheduler_dir or Path(__file__).resolve().parents[1],
        )
        for i in range(a.schedulers)
    ]
    background: list[asyncio.Task[Any]] = []
    nc: NATS | None = None
    try:
        nc = await nats.connect(url.split(","), pending_size=1 << 27, max_reconnect_attempts=-1)
        await wait_for_jetstream(nc)
        sim = Sim(nc, a)
        for _ in range(a.nodes):
            sim.add_node()

        async def roll_call(_: Any) -> None:
            for n in list(sim.nodes.values()):
                await nc.publish(subjects.fleet_heartbeat(n.id), n.advert().encode())

        await nc.subscribe(subjects.FLEET_ROLL_CALL, cb=roll_call)
        background.append(asyncio.create_task(sim.advertise_forever()))
        for _ in range(200):
            try:
                await nc.request(subjects.SCHED_PING, b"", timeout=0.5)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # every scheduler has seen every node
        background += [asyncio.create_task(sim.pull_forever(p, m)) for p in POOLS for m in MODELS]
        background.append(asyncio.create_task(sim.churn_forever()))
        cap = capacity(sim.nodes)
        offered = cap * a.overload
        tenants = [
            (f"t{i}", sim.rng.choices([t for t, _ in TIERS], [w for _, w in TIERS])[0]) for i in range(a.tenants)
        ]
        per_tenant = offered / (len(tenants) + 2 * 10)
        gate = asyncio.Semaphore(1024)
        tasks: set[asyncio.Task[None]] = set()
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in scheds}
        nats_pids = [server.proc.pid for server in servers if server.proc is not None]
        nats_cpu0 = {pid: cpu_seconds(pid) for pid in nats_pids}
        t0 = time.time()
        until = t0 + a.seconds
        limited = Limits(rpm=100_000, max_concurrent=10_000)
        gens = [
            asyncio.create_task(
                sim.tenant(name, tier, per_tenant, until, limited if i % 5 == 0 else Limits(), gate, tasks)
            )
            for i, (name, tier) in enumerate(tenants)
        ]
        gens += [
            asyncio.create_task(sim.tenant(f"flood{i}", "standard", per_tenant * 10, until, Limits(), gate, tasks))
            for i in range(2)
        ]
        await asyncio.gather(*gens)
        while tasks:
            await asyncio.sleep(0.1)
        load_end = time.time()
        decisions = [x for x in sim.t.answers if t0 <= x <= load_end]
        admitted_load = set(sim.t.admitted)
        # drain
        drain_deadline = time.time() + a.drain
        while time.time() < drain_deadline and any(sim.t.done[j] == 0 for j in admitted_load):
            await asyncio.sleep(0.5)
        drained = time.time()
        # burst: as fast as the schedulers answer
        burst_gate = asyncio.Semaphore(256)
        b0 = time.time()
        await asyncio.gather(*(sim.submit("burst", "standard", 5, Limits(), burst_gate) for _ in range(a.burst)))
        b1 = time.time()
        end_deadline = time.time() + a.drain
        while time.time() < end_deadline and any(sim.t.done[j] == 0 for j in sim.t.admitted):
            await asyncio.sleep(0.5)
        cpu = {p.pid: cpu_seconds(p.pid) - cpu0[p.pid] for p in scheds}
        nats_cpu = {pid: cpu_seconds(pid) - nats_cpu0[pid] for pid in nats_pids}
        wall = time.time() - t0
        sequential = {}
        for label, lim in (("unlimited", Limits()), ("limited_key_and_org", Limits(rpm=10**6, max_concurrent=10**5))):
            sequential[label] = await sim.sequential(a.sequential, lim, [p.pid for p in scheds])
        end_deadline = time.time() + a.drain
        while time.time() < end_deadline and any(sim.t.done[j] == 0 for j in sim.t.admitted):
            await asyncio.sleep(0.5)
        left_in = {}
        for name in (subjects.WORK_STREAM, subjects.INTAKE_STREAM):
            try:
                left_in[name] = (await sim.js.stream_info(name)).state.messages
            except nats.js.errors.NotFoundError:
                left_in[name] = 0
        consumers = {}
        for stream, name in (
            (subjects.USAGE_STREAM, subjects.SETTLE_CONSUMER),
            (subjects.INTAKE_STREAM, subjects.RELEASE_CONSUMER),
        ):
            try:
                ci = await sim.js.consumer_info(stream, name)
                consumers[name] = {
                    "pending": ci.num_pending,
                    "ack_pending": ci.num_ack_pending,
                    "redelivered": ci.num_redelivered,
                }
            except nats.js.errors.NotFoundError:
                pass
        # -- results --
        t = sim.t
        waits: dict[str, list[float]] = defaultdict(list)
        served: Counter[str] = Counter()
        for job_id in admitted_load:
            tenant, tier, at = t.submitted[job_id]
            if job_id in t.started:
                waits[tier].append(t.started[job_id] - at)
                if t.started[job_id] <= load_end:
                    served[tenant] += 1
        offered_by: Counter[str] = Counter(t.submitted[j][0] for j in admitted_load)
        by_tier: dict[str, list[float]] = defaultdict(list)
        for name, tier in tenants:
            if offered_by[name]:
                by_tier[tier].append(served[name] / offered_by[name])
        lost = [j for j in t.admitted if t.done[j] == 0]
        twice = [j for j, n in t.done.items() if n > 1]
        return {
            "nodes": a.nodes,
            "schedulers": a.schedulers,
            "tenants": a.tenants + 2,
            "seconds": a.seconds,
            "capacity_jobs_per_s": round(cap, 1),
            "offered_jobs_per_s": round(offered, 1),
            "admitted": len(t.admitted),
            "refused": dict(t.refused),
            "decisions_per_s_under_load": round(len(decisions) / max(load_end - t0, 1e-9), 1),
            "decisions_per_s_burst": round(a.burst / max(b1 - b0, 1e-9), 1),
            "nats_servers": len(servers),
            "scheduler_cpu_percent_of_a_core": [round(100 * c / wall, 1) for c in cpu.values()],
            "nats_cpu_percent_of_a_core": [round(100 * c / wall, 1) for c in nats_cpu.values()],
            "per_1000_nodes": {
                "one_scheduler_cpu_percent": round(100 * sum(cpu.values()) / len(cpu) / wall * 1000 / a.nodes, 1),
                "one_nats_server_cpu_percent": round(
                    100 * sum(nats_cpu.values()) / len(nats_cpu) / wall * 1000 / a.nodes, 1
                ),
            },
            "scheduler_cpu_ms_per_decision_all_included": round(1000 * sum(cpu.values()) / max(len(t.answers), 1), 3),
            "sequential_admission": sequential,
            "queue_wait_s": {
                tier: {"p50": round(pct(w, 0.5), 3), "p99": round(pct(w, 0.99), 3), "n": len(w)}
                for tier, w in sorted(waits.items())
            },
            "jain_by_tier": {tier: round(jain(xs), 4) for tier, xs in sorted(by_tier.items())},
            "flood_share_served": {
                f"flood{i}": round(served[f"flood{i}"] / max(offered_by[f"flood{i}"], 1), 3) for i in range(2)
            },
            "churn": {"left": sim.left, "killed": sim.killed, "joined": sim.joined},
            "drain_s": round(drained - load_end, 1),
            "jobs_lost": len(lost),
            "jobs_run_twice": len(twice),
            "left_in_streams": left_in,
            "sim_errors": dict(sim.errors),
            "consumers": consumers,
        }
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if nc is not None:
            await nc.close()
        for p in scheds:
            p.terminate()
        for p in scheds:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for server in servers:
            server.stop()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--schedulers", type=int, default=2)
    p.add_argument("--tenants", type=int, default=60)
    p.add_argument("--seconds", type=float, default=30.0, help="how long tenants submit")
    p.add_argument("--overload", type=float, default=1.3, help="offered load / fleet capacity")
    p.add_argument("--churn", type=float, default=0.01, help="share of nodes replaced every second")
    p.add_argument("--burst", type=int, default=3000)
    p.add_argument("--sequential", type=int, default=500, help="admissions one at a time, unlimited and limited")
    p.add_argument("--drain", type=float, default=120.0, help="seconds to wait for the queues to empty")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--no-usage", action="store_true", help="publish no usage records (nothing settles)")
    p.add_argument("--profile", action="store_true", help="run the schedulers under cProfile (files in the tmp dir)")
    p.add_argument("--scheduler-dir", default="", help="run the scheduler of another checkout (for comparisons)")
    p.add_argument("--sync-always", action="store_true", help="nats-server fsyncs every write")
    p.add_argument("--cluster", action="store_true", help="a three-node NATS cluster, every stream R3")
    return p.parse_args()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse())), indent=2))
