"""A real Tokenyard stack for tests and benchmarks: nats-server, scheduler and worker
processes, and the API served by uvicorn on 127.0.0.1 inside the test's event loop.

NATS runs with authentication, as `tokenyard up` runs it: each role connects with its own
credentials (`broker_api.nats_auth`, made in a few milliseconds per test), and the test's own
connection (`connect`, `bus`) with an identity that may do everything in the account.
`Stack(tmp, auth=False)` runs an unauthenticated NATS instead.

Every process is started here and stopped here, by its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import uvicorn
from nats.aio.client import Client as NATS

from broker_api.app import create_app
from broker_api.connection import Deadlines, guarded_protocol
from broker_api.embedded_nats import NatsServer
from broker_api.nats_auth import AuthDir, write_secret
from broker_api.settings import ApiSettings
from schemas import subjects
from schemas.jobs import NodeAdvert

ADMIN_KEY = "ty_admin_test-secret-key-0123456789"
SHUTDOWN_GRACE = 5.0  # seconds a gateway under test waits for open requests when it stops
API_START_TIMEOUT = 60.0  # seconds a gateway process (`spawn_api`) may take to answer /healthz

FAST_WORKER = {
    "TOKENYARD_BACKEND": "echo",
    "TOKENYARD_ECHO_DIRECTIVES": "1",  # the fault tests' [[crash]], [[fail]], [[die-after]], [[delay]]
    "TOKENYARD_HEARTBEAT": "0.2",
    "TOKENYARD_ACK_WAIT": "1.5",
    "TOKENYARD_COALESCE_MS": "5",
    "TOKENYARD_DRAIN_TIMEOUT": "5",
    "TOKENYARD_LOG_LEVEL": "warning",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Stack:
    """Start pieces one by one (`start_nats`, `start_scheduler`, `start_worker`, `start_api`)."""

    def __init__(self, tmp: Path, *, sync_always: bool = False, auth: bool = True, nats_url: str = "") -> None:
        self.tmp = tmp
        self.sync_always = sync_always
        self.external_nats = nats_url  # an existing NATS (a cluster's URLs, comma-separated) instead of start_nats
        self.nats: NatsServer | None = None
        self.procs: list[Proc] = []
        self.api_url = ""  # the first API started
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[Any]]] = []
        self.nc: NATS | None = None
        self.auth = AuthDir.init(tmp / "auth", local_worker=True) if auth else None
        self.admin_creds = ""  # may do everything in the account: the test's own connections
        if self.auth is not None:
            self.admin_creds = str(self.auth.path / "creds" / "test-admin.creds")
            write_secret(Path(self.admin_creds), self.auth.issue("test-admin", None)[0])

    @property
    def nats_url(self) -> str:
        if self.external_nats:
            return self.external_nats
        assert self.nats is not None
        return self.nats.url

    def creds(self, role: str) -> str:
        """The credentials file of a role (`api`, `scheduler`, `worker`, ...); empty without auth."""
        return str(self.auth.path / "creds" / f"{role}.creds") if self.auth is not None else ""

    def nats_server(self, *, port: int = -1, sync_always: bool | None = None) -> NatsServer:
        """A nats-server on the stack's store (start it; tests restart NATS with this too)."""
        return NatsServer(
            self.tmp / "nats",
            port=port,
            sync_always=self.sync_always if sync_always is None else sync_always,
            auth=self.auth.conf_path if self.auth is not None else None,
        )

    def start_nats(self) -> NatsServer:
        self.nats = self.nats_server().start()
        return self.nats

    async def connect(self, **options: Any) -> NATS:
        """A NATS connection for the test itself (all permissions in the account)."""
        if self.admin_creds:
            options.setdefault("user_credentials", self.admin_creds)
        options.setdefault("max_reconnect_attempts", -1)  # a cluster's node may die under the test
        options.setdefault("reconnect_time_wait", 0.5)
        return await nats.connect(self.nats_url.split(","), **options)

    def spawn(self, name: str, module: str, env: dict[str, str], args: list[str] | None = None) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        role = {"broker_api": "api", "broker_api.ledger_main": "ledger"}.get(module, module)
        full_env = {
            **os.environ,
            "TOKENYARD_NATS_URL": self.nats_url,
            "TOKENYARD_NATS_CREDS": self.creds(role),
            "TOKENYARD_LOG_LEVEL": "warning",
            "TOKENYARD_METRICS_PORT": "0",  # a test that scrapes a role gives it a free port
            **env,
        }
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *(args or [])], env=full_env, stdout=out, stderr=subprocess.STDOUT
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_scheduler(self, **env: str) -> Proc:
        return self.spawn("scheduler", "scheduler", env)

    def start_worker(self, **env: str) -> Proc:
        return self.spawn("worker", "worker", {**FAST_WORKER, "TOKENYARD_DATA_DIR": str(self.tmp / "data"), **env})

    async def start_api(self, **overrides: Any) -> str:
        """Serve a gateway on a free port; several may run side by side. Returns its URL."""
        values: dict[str, Any] = {
            "nats_url": self.nats_url,
            "data_dir": str(self.tmp / "data"),
            "admin_key": ADMIN_KEY,
            "nats_creds": self.creds("api"),
            "nats_auth_dir": str(self.auth.path) if self.auth is not None else "",
            "attempt_silence": 1.0,
            "request_timeout": 20.0,
            "log_level": "warning",
            "ledger": True,  # in process: most tests read usage from the gateway they started
        }
        values.update(overrides)
        settings = ApiSettings.build(**values)
        port = free_port()
        app = create_app(settings, admin_key=ADMIN_KEY)
        # A bounded graceful shutdown: a request still open at close is cancelled after it, and
        # the lifespan's shutdown (ledger, directory, NATS) still runs before nats-server stops.
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            http=guarded_protocol(
                Deadlines(settings.header_timeout, settings.body_timeout, write_stall=settings.stream_stall_timeout)
            ),
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        self._servers.append((server, task))
        for _ in range(1200):  # 30 s: on a cluster the lifespan makes a dozen streams, on a busy machine
            if server.started or task.done():
                break
            await asyncio.sleep(0.025)
        if not server.started:
            raise RuntimeError("the API did not start")
        url = f"http://127.0.0.1:{port}"
        self.api_url = self.api_url or url
        return url

    async def spawn_api(self, **env: str) -> tuple[Proc, str]:
        """The API as its own process (for tests that kill it). Returns it and its URL."""
        port = free_port()
        proc = self.spawn(
            "api",
            "broker_api",
            {
                "TOKENYARD_ADMIN_KEY": ADMIN_KEY,
                "TOKENYARD_PORT": str(port),
                "TOKENYARD_ATTEMPT_SILENCE": "1.0",
                "TOKENYARD_NATS_AUTH_DIR": str(self.auth.path) if self.auth is not None else "",
                "TOKENYARD_LEDGER": "true",
                "TOKENYARD_DATA_DIR": str(self.tmp / "data"),  # never the user's ~/.tokenyard
                **env,
            },
        )
        url = f"http://127.0.0.1:{port}"
        # 60 s: a loaded machine (load ~17 on two cores) took over the 10 s this once allowed to
        # start the process and connect it; a process that died says so at once.
        deadline = time.monotonic() + API_START_TIMEOUT
        async with httpx.AsyncClient(base_url=url) as http:
            while time.monotonic() < deadline and proc.alive():
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/healthz")).status_code == 200:
                        return proc, url
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the API process did not start:\n{proc.output()}")

    def start_ledger(self, **env: str) -> tuple[Proc, str]:
        """The ledger role as its own process (SQLite in the data dir unless
        TOKENYARD_DATABASE_URL says otherwise). Returns it and the URL of its /metrics."""
        port = free_port()
        values = {
            "TOKENYARD_DATA_DIR": str(self.tmp / "ledger"),
            "TOKENYARD_METRICS_HOST": "127.0.0.1",
            "TOKENYARD_METRICS_PORT": str(port),
            **env,
        }
        return self.spawn("ledger", "broker_api.ledger_main", values), f"http://127.0.0.1:{port}"

    async def bus(self) -> NATS:
        if self.nc is None:
            self.nc = await self.connect()
        return self.nc

    async def wait_for_scheduler(self, timeout: float = 15.0) -> None:
        nc = await self.bus()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await nc.request(subjects.SCHED_PING, b"", timeout=0.5)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.05)
        raise TimeoutError("no scheduler answered")

    async def wait_for_model(self, model: str, *, nodes: int = 1, timeout: float = 30.0) -> None:
        """Until the API lists `model` and `nodes` workers advertise it with free slots."""
        seen: dict[str, NodeAdvert] = {}
        nc = await self.bus()

        async def on_advert(msg: Any) -> None:
            advert = NodeAdvert.decode(msg.data)
            if any(m.id == model for m in advert.models) and not advert.draining:
                seen[advert.node] = advert

        sub = await nc.subscribe(subjects.FLEET_HEARTBEAT_ALL, cb=on_advert)
        deadline = time.monotonic() + timeout
        try:
            async with httpx.AsyncClient(base_url=self.api_url, headers=auth_headers()) as http:
                while time.monotonic() < deadline:
                    if len(seen) >= nodes:
                        r = await http.get("/v1/models")
                        if r.status_code == 200 and model in {m["id"] for m in r.json()["data"]}:
                            return
                    await asyncio.sleep(0.05)
        finally:
            await sub.unsubscribe()
        logs = "\n".join(f"--- {p.name} ---\n{p.output()[-2000:]}" for p in self.procs)
        raise TimeoutError(f"model {model!r} not served by {nodes} node(s) within {timeout} s\n{logs}")

    async def close(self) -> None:
        for server, task in self._servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, SHUTDOWN_GRACE + 20)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        for proc in reversed(self.procs):
            proc.stop()
        if self.nats is not None:
            self.nats.stop()


def auth_headers(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
