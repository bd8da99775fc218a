"""The chaos run (issue 11): a bounded load while processes are killed and frozen, then a check
of every request's history against the promises of ../shared/RELIABILITY.md.

The stack: NATS (one node, or a three-node cluster), two schedulers, three echo workers, the
ledger role and two gateways, each its own process so that any of them can be SIGKILLed or
SIGSTOPped and started again on the same port. The load: plain and streamed chat requests over
several keys (unlimited, and limited by rpm and by tokens per day), `concurrency` at a time,
each with an echo answer known in advance (`expected`), so the text checks itself.

Faults, drawn from a seeded RNG, one at a time with a pause between: a worker SIGKILLed (then
started again) or SIGSTOPped for a few seconds, a gateway SIGKILLed and restarted, a scheduler
SIGKILLed and restarted, and NATS: the single node SIGKILLed and restarted on its store, or one
node of the cluster. The run is bounded in requests, faults and seconds.

The history check (`check`), over every request:
- exactly one terminal outcome, within its deadline: a whole answer; an HTTP error with an
  OpenAI error body; for a stream, an error event then the end; or, only for a request whose
  gateway was killed while it ran, the connection cut. Never a hang.
- the text received is the echo answer or, for a stream cut by an error (or an answer of the
  tokens key cut at what its daily budget had left: finish "length"), a prefix of it on a word
  boundary: tokens in order, no gap, no duplicate;
- at most one usage record per job (JetStream's per-subject count and the ledger's rows), and
  one for every job the client saw run;
- limits held: the rpm key never got more than its rpm admitted in any 60 s, the tokens key
  never more than its daily tokens;
- nothing acknowledged lost: every accepted request (one whose answer started) ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats.errors

from schemas import subjects
from tests.cluster import NatsCluster
from tests.helpers import ECHO, Sse
from tests.stack import FAST_WORKER, Proc, Stack, auth_headers, free_port

RPM = 60  # the rpm key's limit
TOKENS_PER_DAY = 3000  # the tokens key's limit
# A scheduler's log line of one placement (structlog's console format, keys sorted)
ENQUEUED = re.compile(r"dispatch=(?P<dispatch>\d+) .*job_id=(?P<job>[0-9a-f]+)")
NOT_CONNECTED = "not connected: ConnectTimeout"  # an outcome's `cut` when its connect timed out
NOT_CONNECTED_SHARE = 0.01  # more than this share of requests not connected is a problem after all
FAULTS = ("worker_kill", "worker_stop", "gateway_kill", "scheduler_kill", "nats_kill")


@dataclass(frozen=True)
class Plan:
    seed: int = 1
    requests: int = 200
    concurrency: int = 12
    faults: int = 8
    seconds: float = 60.0  # the load stops being offered after this long, done or not
    cluster: bool = False
    stream_share: float = 0.5
    tokens: tuple[int, int] = (3, 20)  # answer lengths, in tokens
    rate: int = 60  # tokens/s per answer
    request_timeout: float = 30.0
    log_level: str = "warning"  # every role's (info: each job's path can be traced in the logs kept)


@dataclass
class Role:
    """A process of the stack that the chaos may kill and start again the same way."""

    name: str
    module: str
    env: dict[str, str]
    proc: Proc
    port: int = 0  # a gateway's

    def alive(self) -> bool:
        return self.proc.alive()


@dataclass
class Fault:
    kind: str
    victim: str
    start: float  # monotonic
    end: float = 0.0


@dataclass
class Outcome:
    i: int
    key: str
    stream: bool
    expected: str
    gateway: int
    started: float
    ended: float = 0.0
    status: int = 0  # HTTP status; 0: no response (connection refused or cut before the headers)
    text: str = ""
    finish: str | None = None
    error: str = ""  # the error body's or error event's message
    cut: str = ""  # the transport error that ended it, if any
    job_id: str = ""
    done: bool = False  # a stream's [DONE] came
    unreadable: str = ""  # a response body that is not a JSON object (its start)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Report:
    requests: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cut_by_gateway: int = 0
    not_connected: int = 0  # requests whose TCP connect timed out: never accepted (see `_request`)
    capped: int = 0  # answers of the tokens key cut at what its daily budget had left (finish "length")
    streams_interrupted: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    jobs_billed: int = 0
    counted_by: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"requests {self.requests}, answered whole {self.answered}, streams ended by an error event "
            f"{self.streams_interrupted}, cut with their gateway {self.cut_by_gateway}, capped by the token budget "
            f"{self.capped}, not connected in time {self.not_connected}",
            f"errors by status/code: {dict(sorted(self.errors.items()))}",
            f"faults: {dict(sorted(self.faults.items()))}",
            f"jobs billed {self.jobs_billed}, counted by: {dict(sorted(self.counted_by.items()))}",
            f"{self.seconds:.1f} s",
        ]


def _json_or_error(body: bytes, o: Outcome) -> dict[str, Any]:
    """An answer's JSON object; {} (noted in `o.unreadable`) if the body is not one: a response
    the contract does not allow, never to be mistaken for a cut connection."""
    try:
        answer = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        o.unreadable = body[:200].decode(errors="replace")
        return {}
    return answer


def word_prefix(text: str, whole: str) -> bool:
    """`text` is `whole` or a part of it from its start that ends on a word boundary."""
    return whole.startswith(text) and whole[len(text) : len(text) + 1] in (" ", "")


def expected_text(i: int, tokens: int) -> str:
    words = [f"c{i}", f"w{i}"]
    return " ".join(words[j % len(words)] for j in range(tokens))


class Chaos:
    def __init__(self, tmp: Path, plan: Plan) -> None:
        self.tmp = tmp
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.cluster: NatsCluster | None = NatsCluster(tmp / "cluster") if plan.cluster else None
        self.stack = Stack(tmp, nats_url=self.cluster.url if self.cluster else "", auth=False, sync_always=True)
        self.nats_port = 0
        self.schedulers: list[Role] = []
        self.workers: list[Role] = []
        self.gateways: list[Role] = []
        self.keys: dict[str, str] = {}  # name -> secret
        self.key_ids: dict[str, str] = {}  # name -> key id
        self.faults: list[Fault] = []
        self.outcomes: list[Outcome] = []
        self.started = 0.0

    # --- the stack ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.cluster is not None:
            self.cluster.start()
            await self.cluster.wait_for_jetstream()
        else:
            self.stack.nats = self.stack.nats_server(sync_always=True).start()
            self.nats_port = self.stack.nats.port
        common = {"TOKENYARD_REPLICAS": "0", "TOKENYARD_INTAKE_ACK_WAIT": "2"}
        for i in range(2):
            self.schedulers.append(self._spawn(f"scheduler{i}", "scheduler", common))
        self.stack.start_ledger(TOKENYARD_LEDGER_ACK_WAIT="2", TOKENYARD_FLEET_EVENTS="false")
        for i in range(3):
            env = {**FAST_WORKER, "TOKENYARD_NODE_ID": f"w{i}", "TOKENYARD_SLOTS": "8"}
            env["TOKENYARD_DATA_DIR"] = str(self.tmp / f"worker{i}")
            self.workers.append(self._spawn(f"worker{i}", "worker", env))
        for i in range(2):
            port = free_port()
            env = {
                "TOKENYARD_ADMIN_KEY": auth_headers()["Authorization"].removeprefix("Bearer "),
                "TOKENYARD_PORT": str(port),
                "TOKENYARD_ATTEMPT_SILENCE": "1.0",
                "TOKENYARD_LEDGER": "false",
                "TOKENYARD_REPLICAS": "0",
                "TOKENYARD_REQUEST_TIMEOUT": str(self.plan.request_timeout),
                "TOKENYARD_DATA_DIR": str(self.tmp / f"gateway{i}"),
                "TOKENYARD_ORPHAN_GRACE": "2",
            }
            self.gateways.append(self._spawn(f"gateway{i}", "broker_api", env, port=port))
        for g in self.gateways:
            await self._until_up(g)
        self.stack.api_url = self.url(0)
        await self.stack.wait_for_model(ECHO, nodes=3, timeout=60)
        await self._make_keys()

    def _spawn(self, name: str, module: str, env: dict[str, str], *, port: int = 0) -> Role:
        env = {**env, "TOKENYARD_LOG_LEVEL": self.plan.log_level}
        return Role(name, module, env, self.stack.spawn(name, module, env), port)

    def _respawn(self, role: Role) -> None:
        role.proc = self.stack.spawn(role.name, role.module, role.env)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.gateways[i].port}"

    async def _until_up(self, gateway: Role, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as http:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{gateway.name} did not start:\n{gateway.proc.output()[-3000:]}")

    async def _make_keys(self) -> None:
        async with httpx.AsyncClient(base_url=self.url(0), headers=auth_headers(), timeout=30) as http:
            for name, limits in (
                ("free", {}),
                ("free2", {}),
                ("rpm", {"rpm": RPM}),
                ("tokens", {"tokens_per_day": TOKENS_PER_DAY}),
            ):
                r = await http.post("/v1/admin/keys", json={"name": f"chaos-{name}", "limits": limits})
                assert r.status_code == 201, r.text
                self.keys[name], self.key_ids[name] = r.json()["key"], r.json()["id"]
        await asyncio.sleep(1.0)  # every gateway's directory follows the new keys

    async def close(self) -> None:
        for role in [*self.gateways, *self.workers, *self.schedulers]:
            role.proc.signal(signal.SIGCONT)
        await self.stack.close()
        if self.cluster is not None:
            self.cluster.stop()

    # --- the load ----------------------------------------------------------------------

    async def run(self) -> None:
        started = self.started = time.monotonic()
        stop_at = started + self.plan.seconds
        chaos = asyncio.create_task(self._faults(stop_at))
        try:
            await self._load(stop_at)
        finally:
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
            await self._heal()

    async def _load(self, stop_at: float) -> None:
        gate = asyncio.Semaphore(self.plan.concurrency)
        limits = httpx.Limits(max_connections=self.plan.concurrency * 2, max_keepalive_connections=0)
        timeout = httpx.Timeout(self.plan.request_timeout + 30, connect=5)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:

            async def one(i: int) -> None:
                async with gate:
                    if time.monotonic() < stop_at:
                        self.outcomes.append(await self._request(http, i))

            await asyncio.gather(*(one(i) for i in range(self.plan.requests)))

    def _draw(self, i: int) -> tuple[str, bool, int]:
        r = random.Random(f"{self.plan.seed}-{i}")
        key = r.choices(["free", "free2", "rpm", "tokens"], weights=[4, 3, 2, 1])[0]
        return key, r.random() < self.plan.stream_share, r.randint(*self.plan.tokens)

    async def _request(self, http: httpx.AsyncClient, i: int) -> Outcome:
        key, stream, tokens = self._draw(i)
        o = Outcome(i, key, stream, expected_text(i, tokens), i % len(self.gateways), time.monotonic())
        body: dict[str, Any] = {
            "model": ECHO,
            "messages": [{"role": "user", "content": f"c{i} w{i} [[tokens={tokens}]] [[rate={self.plan.rate}]]"}],
            "stream": stream,
        }
        headers = auth_headers(self.keys[key])
        try:
            try:
                await self._send(http, body, headers, o)
            except httpx.ConnectError:  # that gateway is down: a load balancer would try the other
                o.gateway = (o.gateway + 1) % len(self.gateways)
                await self._send(http, body, headers, o)
        except httpx.ConnectTimeout:
            # A connect to a listening socket on 127.0.0.1 completes in the kernel, whatever the
            # gateway's loop does: only this load generator's own starved loop (run 7, load ~20:
            # three at one instant, on both gateways) times it out. Never accepted, so no promise
            # of the gateway's applies; counted, and bounded in `check`.
            o.cut = NOT_CONNECTED
        except httpx.TimeoutException as e:
            o.cut = f"timeout: {type(e).__name__}"
        except (httpx.TransportError, json.JSONDecodeError) as e:  # (an event's JSON cut short)
            o.cut = f"{type(e).__name__}: {e}"
        o.ended = time.monotonic()
        return o

    async def _send(self, http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str], o: Outcome) -> None:
        url = self.url(o.gateway)
        if o.stream:
            await self._stream(http, url, body, headers, o)
            return
        r = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        o.status = r.status_code
        answer = _json_or_error(r.content, o)
        if r.status_code == 200 and "choices" in answer:
            o.job_id = answer["id"].removeprefix("chatcmpl-")
            o.text = answer["choices"][0]["message"]["content"]
            o.finish = answer["choices"][0]["finish_reason"]
        elif "error" in answer:
            o.error = f"{r.status_code} {answer['error'].get('code')}: {answer['error']['message']}"

    async def _stream(
        self, http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], o: Outcome
    ) -> None:
        sse = Sse()
        try:  # bounded past the httpx read timeout: a stream that trickles on for ever is a hang too
            await sse.read(
                http, f"{url}/v1/chat/completions", body, headers=headers, timeout=self.plan.request_timeout + 60
            )
        except TimeoutError:
            o.cut = "timeout: the whole stream"
        finally:  # what came, also when the connection was cut
            o.status, o.text, o.finish, o.done = sse.status, sse.text, sse.finish, sse.done
            o.job_id = sse.id.removeprefix("chatcmpl-")
            if sse.error is not None:
                o.error = f"event {sse.error.get('code')}: {sse.error['message']}"
        if sse.status not in (0, 200):
            answer = _json_or_error(sse.body, o)
            if "error" in answer:
                o.error = f"{sse.status} {answer['error'].get('code')}: {answer['error']['message']}"

    # --- the faults --------------------------------------------------------------------

    async def _faults(self, stop_at: float) -> None:
        await asyncio.sleep(self.rng.uniform(1.0, 2.0))
        kinds: list[str] = []
        for _ in range(self.plan.faults):
            if time.monotonic() > stop_at - 2:
                return
            if not kinds:  # every kind once, in a random order, then again: short runs see them all
                kinds = self.rng.sample(FAULTS, len(FAULTS))
            kind = kinds.pop()
            await self._fault(kind)
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))

    async def _fault(self, kind: str) -> None:
        rng = self.rng
        if kind == "worker_kill":
            role = rng.choice(self.workers)
            fault = self._begin(kind, role.name)
            role.proc.kill()
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            self._respawn(role)
        elif kind == "worker_stop":
            role = rng.choice(self.workers)
            fault = self._begin(kind, role.name)
            role.proc.signal(signal.SIGSTOP)
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            role.proc.signal(signal.SIGCONT)
        elif kind == "gateway_kill":
            role = rng.choice(self.gateways)
            fault = self._begin(kind, role.name)
            role.proc.kill()
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            self._respawn(role)
            await self._until_up(role)
        elif kind == "scheduler_kill":
            role = rng.choice(self.schedulers)
            fault = self._begin(kind, role.name)
            role.proc.kill()
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            self._respawn(role)
        else:
            fault = self._begin(kind, "nats")
            await self._kill_nats(rng.uniform(0.5, 2.0))
        fault.end = time.monotonic()

    def _begin(self, kind: str, victim: str) -> Fault:
        fault = Fault(kind, victim, time.monotonic())
        self.faults.append(fault)
        return fault

    async def _kill_nats(self, down: float) -> None:
        if self.cluster is not None:
            i = self.rng.randrange(3)
            self.faults[-1].victim = f"nats n{i + 1}"
            self.cluster.kill(i)
            await asyncio.sleep(down)
            await asyncio.to_thread(self.cluster.restart, i)
            return
        assert self.stack.nats is not None
        self.stack.nats.kill()
        await asyncio.sleep(down)
        self.stack.nats = await asyncio.to_thread(self.stack.nats_server(port=self.nats_port, sync_always=True).start)

    async def _heal(self) -> None:
        """Everything up again (a fault cut short by the end of the run)."""
        for role in [*self.workers, *self.schedulers, *self.gateways]:
            role.proc.signal(signal.SIGCONT)
            if not role.alive():
                self._respawn(role)
        for g in self.gateways:
            await self._until_up(g)

    # --- the history check -------------------------------------------------------------

    def gateway_killed_during(self, o: Outcome) -> bool:
        name = self.gateways[o.gateway].name
        return any(
            f.kind == "gateway_kill" and f.victim == name and f.start <= o.ended and (f.end or o.ended) >= o.started
            for f in self.faults
        )

    async def check(self) -> Report:
        report = Report(requests=len(self.outcomes), faults=Counter(f.kind for f in self.faults))
        report.seconds = max((o.ended for o in self.outcomes), default=self.started) - self.started
        problems: list[str] = []
        for o in self.outcomes:
            problems += [f"request {o.i}: {p}" for p in self._check_one(o, report)]
        billed = await self._billing(problems, report)
        self._check_limits(billed, problems)
        self._check_placements(problems)
        if report.not_connected > NOT_CONNECTED_SHARE * max(report.requests, 1):
            problems.append(f"{report.not_connected} requests could not connect in time: more than the load's own lag")
        if problems:
            raise AssertionError(
                f"{len(problems)} problems:\n" + "\n".join(problems[:40]) + "\n" + "\n".join(report.lines())
            )
        return report

    def _trace(self, o: Outcome) -> str:
        """What to look for in the logs of a request that went wrong: its job, gateway, how far
        it got, and the faults around it (seconds from the start of the load)."""
        at = lambda t: f"{t - self.started:.1f}"  # noqa: E731
        near = [
            f"{f.kind} {f.victim} {at(f.start)}-{at(f.end) if f.end else '?'}"
            for f in self.faults
            if f.start <= o.ended + 3 and (f.end or o.ended) >= o.started - 3
        ]
        return (
            f"job {o.job_id or '?'} on {self.gateways[o.gateway].name}, {len(o.text.split())} words in, "
            f"[DONE] {'came' if o.done else 'not yet'}, {at(o.started)}-{at(o.ended)} s; faults around: {near}"
        )

    def _check_one(self, o: Outcome, report: Report) -> list[str]:
        out: list[str] = []
        if o.seconds > self.plan.request_timeout + 5:
            out.append(f"took {o.seconds:.1f} s, past its deadline")
        if o.cut == NOT_CONNECTED:
            report.not_connected += 1
            return out
        if o.cut.startswith("timeout"):
            return [*out, f"hung: {o.cut}: {self._trace(o)}"]
        if o.unreadable:
            out.append(f"HTTP {o.status} with a body that is not a JSON object: {o.unreadable!r}")
            return out
        if o.cut:
            if not self.gateway_killed_during(o):
                out.append(f"connection cut ({o.cut}) with no gateway killed: {self._trace(o)}")
            else:
                report.cut_by_gateway += 1
            if o.text and not o.expected.startswith(o.text):
                out.append(f"text {o.text!r} is not a prefix of {o.expected!r}")
            return out
        if o.status != 200:
            report.errors[o.error.split(":")[0]] += 1
            if not o.error:
                out.append(f"HTTP {o.status} without an error body")
            elif o.status == 500:  # an error nothing translated: never an answer the contract allows
                out.append(f"HTTP 500: {o.error}")
            return out
        if not o.stream or (o.done and not o.error):
            capped = o.key == "tokens" and o.finish == "length" and word_prefix(o.text, o.expected)
            if capped:  # the daily budget had less left than the answer: the worker stopped at the grant
                report.capped += 1
            elif o.text != o.expected or o.finish != "stop":
                out.append(f"answer {o.text!r} ({o.finish}), expected {o.expected!r}: {self._trace(o)}")
            elif o.stream and not o.done:
                out.append("stream without [DONE]")
            else:
                report.answered += 1
            return out
        if o.error:  # a stream that ended with an error event: what it got must be a clean prefix
            report.streams_interrupted += 1
            report.errors[o.error.split(":")[0]] += 1
            if o.text and not word_prefix(o.text, o.expected):
                out.append(f"interrupted text {o.text!r} is not a word prefix of {o.expected!r}")
            return out
        return [*out, f"stream ended without [DONE] or an error event ({o.text!r}): {self._trace(o)}"]

    async def _billing(self, problems: list[str], report: Report) -> dict[str, dict[str, Any]]:
        """One usage record per job in the stream and one ledger row per job; every job the
        client saw run among them. Returns the rows by job id."""
        ran = {o.job_id for o in self.outcomes if o.job_id}
        nc = await self.stack.bus()
        deadline = time.monotonic() + 60
        rows: dict[str, dict[str, Any]] = {}
        per_job: dict[str, int] = {}
        while True:
            try:  # the test's own connection may be finding a new node or leader after a NATS fault
                info = await nc.jetstream().stream_info(subjects.USAGE_STREAM, subjects_filter=subjects.USAGE_ALL)
            except (nats.errors.Error, asyncio.TimeoutError):
                await asyncio.sleep(0.5)
                continue
            per_job = {s.rsplit(".", 1)[-1]: n for s, n in (info.state.subjects or {}).items()}
            rows = await self._ledger_rows()
            if (ran <= set(rows) and set(per_job) == set(rows)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        twice = {j: n for j, n in per_job.items() if n != 1}
        if twice:
            problems.append(f"jobs with more than one usage record: {twice}")
        missing = ran - set(rows)
        if missing:
            problems.append(f"{len(missing)} jobs that ran have no ledger row: {sorted(missing)[:5]}")
        if set(per_job) != set(rows):
            problems.append(f"the ledger ({len(rows)}) and the usage stream ({len(per_job)}) disagree")
        report.jobs_billed = len(rows)
        report.counted_by = Counter(str(r.get("counted_by", "gateway")) for r in rows.values())
        return rows

    async def _ledger_rows(self) -> dict[str, dict[str, Any]]:
        """The ledger role's rows, read from its SQLite file (every one, however many)."""

        def read() -> dict[str, dict[str, Any]]:
            path = self.tmp / "ledger" / "ledger.sqlite"
            if not path.exists():
                return {}
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
                db.row_factory = sqlite3.Row
                return {row["job_id"]: dict(row) for row in db.execute("SELECT * FROM usage")}

        return await asyncio.to_thread(read)

    def _check_placements(self, problems: list[str]) -> None:
        """No job placed twice at one dispatch: every scheduler logs `job.enqueued` once per
        placement it made (only at info level: at warning nothing of it is seen)."""
        if self.plan.log_level != "info":
            return
        placed: Counter[tuple[str, str]] = Counter()
        for proc in self.stack.procs:
            if proc.name.startswith("scheduler"):
                for line in proc.output().splitlines():
                    if " job.enqueued " in line and (m := ENQUEUED.search(line)):
                        placed[(m["job"], m["dispatch"])] += 1
        twice = sorted(f"{job}.{dispatch}" for (job, dispatch), n in placed.items() if n > 1)
        if twice:
            problems.append(f"{len(twice)} jobs placed twice at one dispatch: {twice[:5]}")

    def _check_limits(self, rows: dict[str, dict[str, Any]], problems: list[str]) -> None:
        by_key: dict[str, list[dict[str, Any]]] = {}
        for row in rows.values():
            by_key.setdefault(row["key_id"], []).append(row)
        # A row's admission happened between its arrival and its first token (or its end): only
        # rows whose whole span lies inside one 60 s window were surely admitted within it. (The
        # arrival alone is not the admission: a request that waited out a NATS fault in its
        # gateway's retries was admitted seconds later.)
        spans = sorted(
            (r["time"], r["time"] + (r["ttft_ms"] or r["duration_ms"]) / 1e3)
            for r in by_key.get(self.key_ids["rpm"], [])
        )
        for j, (t, _) in enumerate(spans):
            within = sum(1 for lo, hi in spans[j:] if hi < t + 60)
            if within > RPM:
                problems.append(f"the rpm key had {within} requests admitted within 60 s of {t:.1f} (limit {RPM})")
                break
        spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in by_key.get(self.key_ids["tokens"], []))
        if spent > TOKENS_PER_DAY:
            problems.append(f"the tokens key was billed {spent} tokens (limit {TOKENS_PER_DAY} a day)")
