"""`tokenyard up`: the embedded default, every role on this machine.

Starts `nats-server` with JetStream on the data dir (unless `--nats-url` names an existing
NATS), then the scheduler, the ledger (SQLite in the data dir), the API and one worker, each as its
own process. Prints the URL,
the admin key and the model once the API answers.

NATS runs with authentication: on first start the data dir gets NATS credentials
(`broker_api.nats_auth`: `nats-auth.conf`, `creds/<role>.creds`, the signing keys), and each
child connects with its role's own. To accept remote nodes, NATS listens where `--nats-listen`
says (127.0.0.1 by default) and joiners are told `--nats-public-url`; the API's `--public-url`
is what `tokenyard nodes token create` tells them to join. `--tls-cert/--tls-key` serve the API
over HTTPS, `--nats-tls-cert/--nats-tls-key` NATS over TLS. Ctrl-C or SIGTERM stops the children in
reverse order (the workers first, so they drain), each by its PID; if any child dies, the rest
are stopped too and the exit code says so.

With `--providers FILE` it also starts one cloud adapter per provider in that file, each with
its own credentials (`adapter-<provider>`). Settings every role shares (log level and format,
replicas) and the ones only some roles read (the scheduler's routing file, the API's cache)
are passed on as `TOKENYARD_*` variables: each role reads its own and ignores the rest. `up`
writes where it listens to the data dir (`api_url`, and `metrics_urls` for the schedulers'
and workers' metrics), which the admin commands and `tokenyard top` read; it removes them when
it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from broker_api.auth import load_or_create_admin_key
from broker_api.auth_cli import provider_models
from broker_api.embedded_nats import NatsServer
from broker_api.lifeline import Lifeline
from broker_api.nats_auth import AuthDir
from schemas.settings import add_setting, creds_path

READY_TIMEOUT = 600.0  # the first start converts the default model, which takes a while


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenyard up", description="Run the whole Tokenyard stack on this machine.")
    add_setting(p, "--host", default="127.0.0.1", help="address the API listens on")
    add_setting(p, "--port", default=8000, type=int, help="port the API listens on")
    add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="keys, queues and converted models")
    add_setting(p, "--nats-url", default="", help="use this NATS instead of starting one")
    add_setting(p, "--nats-port", default=-1, type=int, help="port of the embedded NATS (-1 = any free port)")
    add_setting(
        p,
        "--nats-listen",
        default="127.0.0.1",
        help="address[:port] the embedded NATS listens on (0.0.0.0: remote nodes)",
    )
    add_setting(
        p, "--nats-public-url", default="", help="the NATS URL told to joining nodes (default: from --nats-listen)"
    )
    add_setting(p, "--public-url", default="", help="the API's URL as remote nodes reach it (default: from --host)")
    add_setting(p, "--tls-cert", default="", help="serve the API over HTTPS with this certificate")
    add_setting(p, "--tls-key", default="", help="the API certificate's key")
    add_setting(p, "--nats-tls-cert", default="", help="serve NATS over TLS with this certificate")
    add_setting(p, "--nats-tls-key", default="", help="the NATS certificate's key")
    add_setting(
        p, "--nats-tls-ca", default="", help="CA that signed the NATS certificate (for the children, if private)"
    )
    add_setting(p, "--backend", default="transformers", help="the worker's backend: transformers or echo")
    add_setting(p, "--model-path", default="", help="transformers: a local model directory (default SmolLM2)")
    add_setting(p, "--models", default="", help="public model id(s) the worker serves")
    add_setting(p, "--log-level", default="info", help="debug, info, warning or error")
    add_setting(p, "--log-json", default=False, type=bool, help="every role logs JSON lines")
    add_setting(p, "--providers", default="", help="a provider config (YAML): one cloud adapter per provider")
    add_setting(p, "--routing-file", default="", help="the scheduler's routing policies (JSON)")
    add_setting(p, "--cache", default=True, type=bool, help="the API's response cache")
    add_setting(p, "--cache-ttl", default=3600.0, type=float, help="seconds a cached answer lives")
    add_setting(p, "--cache-max-bytes", default=256 << 20, type=int, help="size cap of the response cache")
    add_setting(p, "--replicas", default=0, type=int, help="JetStream replicas (0: follow the cluster)")
    add_setting(
        p, "--metrics-port", default=9464, type=int, help="the scheduler's metrics port; the workers' follow it"
    )
    return p


class ConfigError(Exception):
    """A setting of `up` that cannot work: one line naming the file or flag and the fix."""


def provider_names(path: str) -> dict[str, tuple[str, ...]]:
    """The providers a config file names, each with the models it maps (each adapter validates
    the rest, with its own keys; its NATS credentials allow only these models' work)."""
    try:
        return provider_models(path)
    except ValueError as e:
        raise ConfigError(f"{e}; fix --providers") from e


def shared_env(a: argparse.Namespace) -> dict[str, str]:
    """The settings every child gets as TOKENYARD_* variables (each reads those it knows)."""
    env = {
        "TOKENYARD_LOG_LEVEL": a.log_level,
        "TOKENYARD_LOG_JSON": "true" if a.log_json else "false",
        "TOKENYARD_CACHE": "true" if a.cache else "false",
        "TOKENYARD_CACHE_TTL": str(a.cache_ttl),
        "TOKENYARD_CACHE_MAX_BYTES": str(a.cache_max_bytes),
        "TOKENYARD_REPLICAS": str(a.replicas),
    }
    if a.routing_file:
        env["TOKENYARD_ROUTING_FILE"] = str(Path(a.routing_file).expanduser().resolve())
    return env


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.nats: NatsServer | None = None
        self.lifeline = Lifeline()  # the children end when this process does, however it ends
        self.guarded: subprocess.Popen[bytes] | None = None  # ends the embedded nats-server with us

    def spawn(self, name: str, module: str, args: list[str], env: dict[str, str]) -> None:
        """Start a role, tied to this launcher by its lifeline (`broker_api.lifeline`); the
        embedded nats-server, started before any role, gets a guard on the first spawn."""
        keep = (self.lifeline.fd,)
        if self.guarded is None and self.nats is not None and self.nats.proc is not None:
            self.guarded = subprocess.Popen(self.lifeline.guard(self.nats.proc.pid), pass_fds=keep)
        proc = subprocess.Popen(self.lifeline.command(module, args), env=env, pass_fds=keep)
        self.children.append((name, proc))

    def dead_child(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                return name, code
        if self.nats is not None and self.nats.proc is not None and self.nats.proc.poll() is not None:
            return "nats-server", self.nats.proc.returncode
        return None

    def stop(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(45 if name == "worker" or name.startswith("adapter") else 15)
                except subprocess.TimeoutExpired:
                    print(f"tokenyard up: {name} did not stop in time; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait(5)
        if self.nats is not None:
            self.nats.stop()


def _wait_ready(base: str, key: str, stack: Stack, deadline: float, *, ca: str = "") -> list[str]:
    # Its own child on loopback, whose certificate names the public host (or is self-signed):
    # this readiness probe does not verify it; clients do.
    context = ssl.create_default_context() if ca else None
    if context is not None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    while time.monotonic() < deadline:
        dead = stack.dead_child()
        if dead:
            raise RuntimeError(f"{dead[0]} exited with code {dead[1]} during start-up")
        try:
            req = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=2, context=context) as resp:
                models = [m["id"] for m in json.load(resp)["data"]]
                if models:
                    return models
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError("the stack did not become ready in time")


def _listen(a: argparse.Namespace) -> tuple[str, int]:
    host, _, port = a.nats_listen.rpartition(":") if ":" in a.nats_listen else (a.nats_listen, "", "")
    return host or "127.0.0.1", int(port) if port else a.nats_port


def _public_host(host: str) -> str:
    """A host name remote machines can use for a wildcard listen address."""
    return socket.getfqdn() if host in {"0.0.0.0", "::", ""} else host


def _embedded_nats(
    a: argparse.Namespace, data: Path, providers: dict[str, tuple[str, ...]]
) -> tuple[NatsServer, dict[str, str]]:
    """Start the embedded, authenticated NATS; returns it and the environment every child
    shares (each child's own credentials are added per child; an adapter's are its provider's)."""
    auth = AuthDir.init(data, local_worker=True, adapters=providers, resolver_dir=data / "nats" / "jwt")
    host, port = _listen(a)
    server = NatsServer(
        data / "nats", host=host, port=port, auth=auth.conf_path, tls_cert=a.nats_tls_cert, tls_key=a.nats_tls_key
    ).start()
    scheme = "tls" if a.nats_tls_cert else "nats"
    public = a.nats_public_url or f"{scheme}://{_public_host(host)}:{server.port}"
    env = {"TOKENYARD_NATS_URL": server.url, "TOKENYARD_NATS_PUBLIC_URL": public}
    if a.nats_tls_ca:
        env["TOKENYARD_NATS_TLS_CA"] = a.nats_tls_ca
    if a.nats_tls_cert:  # the children reach it on 127.0.0.1; the certificate names the public host
        env["TOKENYARD_NATS_TLS_HOSTNAME"] = urllib.parse.urlsplit(public.split(",")[0]).hostname or ""
    return server, env


def _with_creds(env: dict[str, str], data: Path, role: str, own_nats: bool) -> dict[str, str]:
    return {**env, "TOKENYARD_NATS_CREDS": str(creds_path(data, role))} if own_nats else env


def _metrics_ports(base: int, providers: list[str]) -> list[str]:
    """The scheduler's `--metrics-port`, the worker's the next, the adapters' from base + 3 on
    (base + 2, 9466 by default, is the ledger role's); all "0" (off) when base is 0."""
    offsets = [0, 1, *(3 + i for i in range(len(providers)))]
    return [str(base + o) if base > 0 else "0" for o in offsets]


def _start_roles(
    a: argparse.Namespace, stack: Stack, env: dict[str, str], data: Path, own_nats: bool, providers: list[str]
) -> tuple[str, list[str]]:
    """Spawn the scheduler, the ledger, the API, the worker and the adapters. Returns the API's
    public URL and the metrics URLs of the scheduler, the worker and the adapters."""
    scheme = "https" if a.tls_cert else "http"
    public = a.public_url or f"{scheme}://{_public_host(a.host)}:{a.port}"
    ports = _metrics_ports(a.metrics_port, providers)
    stack.spawn("scheduler", "scheduler", ["--metrics-port", ports[0]], _with_creds(env, data, "scheduler", own_nats))
    # the ledger on SQLite in the data dir, its probes on base + 2 (9466 by default)
    ledger_port = str(a.metrics_port + 2) if a.metrics_port > 0 else "0"
    ledger_args = ["--metrics-port", ledger_port]
    stack.spawn("ledger", "broker_api.ledger_main", ledger_args, _with_creds(env, data, "ledger", own_nats))
    api_args = ["--host", a.host, "--port", str(a.port), "--public-url", public]
    if a.tls_cert:
        api_args += ["--tls-cert", a.tls_cert, "--tls-key", a.tls_key]
    stack.spawn("api", "broker_api", api_args, _with_creds(env, data, "api", own_nats))
    worker_args = ["--backend", a.backend, "--metrics-port", ports[1]]
    if a.model_path:
        worker_args += ["--model-path", a.model_path]
    if a.models:
        worker_args += ["--models", a.models]
    stack.spawn("worker", "worker", worker_args, _with_creds(env, data, "worker", own_nats))
    config = str(Path(a.providers).expanduser().resolve()) if providers else ""
    for name, port in zip(providers, ports[2:]):
        args = ["--backend", "cloud", "--providers", config, "--provider", name, "--metrics-port", port]
        stack.spawn(f"adapter {name}", "worker", args, _with_creds(env, data, f"adapter-{name}", own_nats))
    urls = [f"http://127.0.0.1:{port}/metrics" for port in ports] if a.metrics_port > 0 else []
    return public, urls


def _banner(base: str, admin_key: str, models: list[str], nats_url: str, auth: str, public: str) -> None:
    print(
        f"\nTokenyard is up.\n  OpenAI base URL: {base}/v1\n  API key:         {admin_key}\n"
        f"  models:          {', '.join(models)}\n  NATS:            {nats_url}{auth}\n"
        f"  remote nodes:    tokenyard nodes token create --pool own, then on the machine:\n"
        f"                   tokenyard worker join --server {public} --token <token>\n"
        "  watch it:        tokenyard top\nCtrl-C stops it.\n",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    data = Path(a.data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    try:
        providers = provider_names(a.providers) if a.providers else {}
    except ConfigError as e:
        print(f"tokenyard up: {e}", file=sys.stderr)
        return 2
    admin_key, _ = load_or_create_admin_key(str(data), os.environ.get("TOKENYARD_ADMIN_KEY", ""))
    stack = Stack()
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    written = (data / "api_url", data / "metrics_urls")
    try:
        own_nats = not a.nats_url
        nats_env = {"TOKENYARD_NATS_URL": a.nats_url}
        if own_nats:
            stack.nats, nats_env = _embedded_nats(a, data, providers)
        env = {
            **os.environ,
            **nats_env,
            **shared_env(a),
            "TOKENYARD_DATA_DIR": str(data),
            "TOKENYARD_ADMIN_KEY": admin_key,
        }
        public, metrics = _start_roles(a, stack, env, data, own_nats, list(providers))
        host = "127.0.0.1" if a.host in {"0.0.0.0", "::"} else a.host
        base = f"{'https' if a.tls_cert else 'http'}://{host}:{a.port}"
        models = _wait_ready(base, admin_key, stack, time.monotonic() + READY_TIMEOUT, ca=a.tls_cert)
        written[0].write_text(base + "\n")
        written[1].write_text("".join(f"{url}\n" for url in metrics))
        nats_url = nats_env.get("TOKENYARD_NATS_PUBLIC_URL") or nats_env["TOKENYARD_NATS_URL"]
        auth = f" (authenticated; credentials in {data / 'creds'})" if own_nats else ""
        _banner(base, admin_key, models, nats_url, auth, public)
        while not stopping:
            dead = stack.dead_child()
            if dead:
                print(f"tokenyard up: {dead[0]} exited with code {dead[1]}; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as e:
        print(f"tokenyard up: {e}", file=sys.stderr)
        return 1
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        stack.stop()
