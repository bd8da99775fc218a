"""A real three-node JetStream cluster on loopback for the tests: `nats-server` processes from
`broker_api.embedded_nats`, each with its own store dir, fsync on every write, fixed client and
route ports (so a killed node comes back where its peers and clients expect it).

`NatsCluster.start()` returns once every node is up and JetStream has a meta leader (the
JetStream API answers); `kill(i)` is a SIGKILL, `restart(i)` brings the node back on its old
store and ports. Every process is started and stopped here, by its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import nats
import nats.errors

from broker_api.embedded_nats import NatsServer, cluster_config
from broker_api.nats_auth import AuthDir
from schemas import subjects
from tests.stack import free_port

CLUSTER_NAME = "ty-test"


class NatsCluster:
    def __init__(self, tmp: Path, *, size: int = 3, auth: AuthDir | None = None, creds: str = "") -> None:
        """`auth`: every node includes that directory's NATS auth, each with a resolver dir of its
        own (as each server of a real cluster keeps its own); `creds`: what `wait_for_jetstream`
        connects with then."""
        self.tmp = tmp
        self.auth = auth
        self.creds = creds
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.nodes: list[NatsServer] = [self._node(i) for i in range(size)]

    def _node(self, i: int) -> NatsServer:
        extra = cluster_config(
            server_name=f"n{i + 1}",
            cluster_name=CLUSTER_NAME,
            route_port=self.route_ports[i],
            route_ports=self.route_ports,
        )
        store = self.tmp / f"n{i + 1}"
        conf = None
        if self.auth is not None:
            store.mkdir(parents=True, exist_ok=True)
            conf = store / "nats-auth.conf"
            conf.write_text(self.auth.server_config(store / "jwt"))
        return NatsServer(store, port=self.client_ports[i], sync_always=True, extra_config=extra, auth=conf)

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{port}" for port in self.client_ports]

    @property
    def url(self) -> str:
        """Every node, comma-separated: what the roles' `--nats-url` takes."""
        return ",".join(self.urls)

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.start()
        return self

    def kill(self, i: int) -> None:
        """SIGKILL node `i`: no chance to flush or to step down."""
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        self.nodes[i].stop()
        self.nodes[i] = self._node(i)
        self.nodes[i].start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    async def wait_for_jetstream(self, timeout: float = 30.0) -> None:
        """Until the JetStream API answers through every live node: the meta leader exists."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            creds = {"user_credentials": self.creds} if self.creds else {}
            nc = await nats.connect(node.url, max_reconnect_attempts=0, connect_timeout=2, **creds)
            try:
                while True:
                    with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                        reply = await nc.request(subjects.JS_API_INFO, b"", timeout=1.0)
                        if "error" not in json.loads(reply.data):
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"JetStream has no leader on {node.url} after {timeout} s")
                    await asyncio.sleep(0.1)
            finally:
                await nc.close()
