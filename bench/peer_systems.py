"""The systems `peers.py` measures, each started as a user would run it, all on 127.0.0.1:

- `Upstream`: `bench/fast_upstream.py` in its own process (the baseline, and what the others
  forward to);
- `Tokenyard`: nats-server (JetStream, fsync on every write, authenticated: the defaults of
  `tokenyard up`), the scheduler, the API and one cloud-adapter worker forwarding to the
  upstream, each its own process with its own NATS credentials; optionally
  an echo worker too (to tell the cloud adapter's cost from the rest of the path);
- `LiteLLM`: the LiteLLM proxy, installed in its own venv (`bench/.peers/litellm-venv`, made on
  first use), configured to forward to the same upstream.

Each has `base_url` (ending in /v1), `key`, `model` and `pids` (role -> PID of every process
whose CPU counts for it), and `stop()`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import free_port, spawn, stop_all, with_children  # noqa: E402
from broker_api.embedded_nats import NatsServer  # noqa: E402
from broker_api.nats_auth import LOCAL_WORKER, AuthDir  # noqa: E402
from schemas.settings import creds_path  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".peers"
LITELLM_VENV = PEERS / "litellm-venv"
UPSTREAM_MODEL = "fast-model"
UPSTREAM_KEY = "sk-fast-upstream-0123456789"
TOKENYARD_KEY = "ty_admin_bench-key-0123456789abcdef"
TOKENYARD_MODEL = "bench-fast"  # the public id Tokenyard serves the upstream's model under
ECHO_MODEL = "tokenyard/echo"
LITELLM_KEY = "sk-litellm-bench-0123456789"


def wait_models(base_url: str, key: str, deadline: float, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until `GET /v1/models` lists a model; fail early if a process died."""
    while time.monotonic() < deadline:
        for pr in procs:
            if pr.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, pr.args))} exited with {pr.returncode} during start-up")
        try:
            req = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if json.loads(r.read()).get("data"):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base_url} did not become ready in time")


class Upstream:
    name = "upstream"

    def __init__(self, tmp: Path, *, tokens: int, chunk_delay: float = 0.0, server: str = "raw") -> None:
        port = free_port()
        args = ["--port", str(port), "--tokens", str(tokens), "--chunk-delay", str(chunk_delay), "--server", server]
        args += ["--models", UPSTREAM_MODEL]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.key, self.model = UPSTREAM_KEY, UPSTREAM_MODEL
        with open(tmp / f"upstream-{port}.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "fast_upstream.py"), *args], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_models(self.base_url, self.key, time.monotonic() + 30, [self.proc])
        except BaseException:
            self.stop()
            raise
        self.pids = {"upstream": self.proc.pid}

    def stop(self) -> None:
        stop_all([self.proc])


class Tokenyard:
    """API -> scheduler -> cloud-adapter worker -> upstream, with the default durable settings."""

    name = "tokenyard"

    def __init__(
        self,
        tmp: Path,
        upstream: Upstream,
        *,
        slots: int = 0,
        echo: bool = False,
        tokens: int = 16,
        fsync: bool = True,
        traced: str = "",
    ) -> None:
        """`traced`: the role (scheduler, api, worker) run under tracemalloc (`bench/traced.py`),
        its snapshots in `trace_dir`."""
        self.tmp = tmp / "tokenyard"
        self.tmp.mkdir(parents=True, exist_ok=True)
        monitor_port = free_port()
        # NATS with authentication, each role with its own credentials, as `tokenyard up` runs it
        # (broker_api/launcher.py); the cloud adapter with the credentials of its pool.
        AuthDir.init(
            self.tmp, adapters={"fast": (TOKENYARD_MODEL,)}, local_worker=echo, resolver_dir=self.tmp / "nats" / "jwt"
        )
        self.nats = NatsServer(
            self.tmp / "nats",
            sync_always=fsync,
            auth=self.tmp / "nats-auth.conf",
            extra_config=f"http: 127.0.0.1:{monitor_port}",
        )
        self.nats.start()
        self.monitor = f"http://127.0.0.1:{monitor_port}"
        providers = self.tmp / "providers.yaml"
        providers.write_text(
            "providers:\n"
            "  - name: fast\n"
            f"    base_url: {upstream.base_url}\n"
            "    api_keys: [{env: FAST_UPSTREAM_KEY}]\n"
            f"    models: {{{TOKENYARD_MODEL}: {upstream.model}}}\n"
            '    prices: {"*": {input: 0.15, output: 0.60}}\n'
        )
        env = {
            **os.environ,
            "TOKENYARD_NATS_URL": self.nats.url,
            "TOKENYARD_LOG_LEVEL": "warning",
            "TOKENYARD_ADMIN_KEY": TOKENYARD_KEY,
            "TOKENYARD_DATA_DIR": str(self.tmp),
            "FAST_UPSTREAM_KEY": upstream.key,
            "PYTHONPATH": str(HERE.parent),
        }
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.key, self.model = TOKENYARD_KEY, TOKENYARD_MODEL
        log = self.tmp
        cloud = ["--backend", "cloud", "--providers", str(providers), "--provider", "fast", "--node-id", "cloud-1"]
        if slots:
            cloud += ["--slots", str(slots)]

        self.trace_dir = self.tmp / "tracemalloc"

        def creds(role: str) -> dict[str, str]:
            return {**env, "TOKENYARD_NATS_CREDS": str(creds_path(self.tmp, role))}

        def role(name: str, module: str, nats_user: str, *args: str) -> subprocess.Popen[bytes]:
            if name != traced:
                return spawn(module, creds(nats_user), log / f"{name}.log", *args)
            traced_env = {**creds(nats_user), "TOKENYARD_TRACE_DIR": str(self.trace_dir)}
            return spawn("bench.traced", traced_env, log / f"{name}.log", module, *args)

        self.procs: dict[str, subprocess.Popen[bytes]] = {
            "scheduler": role("scheduler", "scheduler", "scheduler"),
            "api": role("api", "broker_api", "api", "--port", str(port)),
            "worker": role("worker", "worker", "adapter-fast", *cloud),
        }
        if echo:
            args = ["--backend", "echo", "--echo-tokens", str(tokens), "--node-id", "echo-1"]
            self.procs["echo"] = spawn("worker", creds(LOCAL_WORKER), log / "echo.log", *args)
        try:
            wait_models(self.base_url, self.key, time.monotonic() + 60, list(self.procs.values()))
            self._wait_model(TOKENYARD_MODEL, time.monotonic() + 30)
            if echo:
                self._wait_model(ECHO_MODEL, time.monotonic() + 30)
        except BaseException:
            self.stop()
            raise
        self.pids = {"nats-server": self.nats.pid, **{role: pr.pid for role, pr in self.procs.items()}}

    def _wait_model(self, model: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            req = urllib.request.Request(f"{self.base_url}/models", headers={"Authorization": f"Bearer {self.key}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if model in {m["id"] for m in json.loads(r.read())["data"]}:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"Tokenyard does not list {model} in time")

    def stop(self) -> None:
        stop_all(reversed(list(self.procs.values())), timeout=45)
        self.nats.stop()


def ensure_litellm_venv(log: Path) -> Path:
    """The LiteLLM proxy's own venv, made on first use; its `litellm` executable."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"# installing the LiteLLM proxy into {LITELLM_VENV} (once; a few minutes)", file=sys.stderr, flush=True)
    PEERS.mkdir(parents=True, exist_ok=True)
    python3 = shutil.which("python3") or sys.executable
    with open(log, "ab") as out:
        steps = [
            [python3, "-m", "venv", str(LITELLM_VENV)],
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
        ]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=1800).returncode != 0:
                shutil.rmtree(LITELLM_VENV, ignore_errors=True)
                raise RuntimeError(f"could not install the LiteLLM proxy ({' '.join(step)} failed; see {log})")
    return exe


def litellm_version() -> str:
    pip = LITELLM_VENV / "bin" / "pip"
    out = subprocess.run([str(pip), "show", "litellm"], capture_output=True, text=True, timeout=60).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")), "?")


class LiteLLM:
    """The LiteLLM proxy with its defaults (one process, no database), a master key, one model."""

    name = "litellm"

    def __init__(self, tmp: Path, upstream: Upstream) -> None:
        self.tmp = tmp / "litellm"
        self.tmp.mkdir(parents=True, exist_ok=True)
        exe = ensure_litellm_venv(self.tmp / "install.log")
        self.version = litellm_version()
        config = self.tmp / "config.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {UPSTREAM_MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{upstream.model}\n"
            f"      api_base: {upstream.base_url}\n"
            f"      api_key: {upstream.key}\n"
            "general_settings:\n"
            f"  master_key: {LITELLM_KEY}\n"
        )
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.key, self.model = LITELLM_KEY, UPSTREAM_MODEL
        # No network here: the model-cost map ships with the package, telemetry is off.
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
        env.pop("PYTHONPATH", None)
        with open(self.tmp / "proxy.log", "ab") as out:
            self.proc = subprocess.Popen(
                [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        try:
            wait_models(self.base_url, self.key, time.monotonic() + 180, [self.proc])
        except BaseException:
            self.stop()
            raise
        self.pids = {f"litellm{'' if i == 0 else f'-{i}'}": pid for i, pid in enumerate(with_children(self.proc.pid))}

    def stop(self) -> None:
        stop_all([self.proc], timeout=20)
