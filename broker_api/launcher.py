"""`tokenyard up`: the embedded default, every role on this machine.

Starts `nats-server` with JetStream on the data dir (unless `--nats-url` names an existing
NATS), then the scheduler, the API and one worker, each as its own process. Prints the URL,
the admin key and the model once the API answers. Ctrl-C or SIGTERM stops the children in
reverse order (the worker first, so it drains), each by its PID; if any child dies, the rest
are stopped too and the exit code says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from broker_api.auth import load_or_create_admin_key
from broker_api.embedded_nats import NatsServer
from schemas.settings import add_setting

READY_TIMEOUT = 600.0  # the first start converts the default model, which takes a while


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenyard up", description="Run the whole Tokenyard stack on this machine.")
    add_setting(p, "--host", default="127.0.0.1", help="address the API listens on")
    add_setting(p, "--port", default=8000, type=int, help="port the API listens on")
    add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="keys, queues and converted models")
    add_setting(p, "--nats-url", default="", help="use this NATS instead of starting one")
    add_setting(p, "--nats-port", default=-1, type=int, help="port of the embedded NATS (-1 = any free port)")
    add_setting(p, "--backend", default="transformers", help="the worker's backend: transformers or echo")
    add_setting(p, "--model-path", default="", help="transformers: a local model directory (default SmolLM2)")
    add_setting(p, "--models", default="", help="public model id(s) the worker serves")
    add_setting(p, "--log-level", default="info", help="debug, info, warning or error")
    return p


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.nats: NatsServer | None = None

    def spawn(self, name: str, module: str, args: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env)
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
                    proc.wait(45 if name == "worker" else 15)
                except subprocess.TimeoutExpired:
                    print(f"tokenyard up: {name} did not stop in time; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait(5)
        if self.nats is not None:
            self.nats.stop()


def _wait_ready(base: str, key: str, stack: Stack, deadline: float) -> list[str]:
    while time.monotonic() < deadline:
        dead = stack.dead_child()
        if dead:
            raise RuntimeError(f"{dead[0]} exited with code {dead[1]} during start-up")
        try:
            req = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                models = [m["id"] for m in json.load(resp)["data"]]
                if models:
                    return models
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError("the stack did not become ready in time")


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    data = Path(a.data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    admin_key, _ = load_or_create_admin_key(str(data), os.environ.get("TOKENYARD_ADMIN_KEY", ""))
    stack = Stack()
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        nats_url = a.nats_url
        if not nats_url:
            stack.nats = NatsServer(data / "nats", port=a.nats_port).start()
            nats_url = stack.nats.url
        env = {
            **os.environ,
            "TOKENYARD_NATS_URL": nats_url,
            "TOKENYARD_DATA_DIR": str(data),
            "TOKENYARD_ADMIN_KEY": admin_key,
            "TOKENYARD_LOG_LEVEL": a.log_level,
        }
        stack.spawn("scheduler", "scheduler", [], env)
        stack.spawn("api", "broker_api", ["--host", a.host, "--port", str(a.port)], env)
        worker_args = ["--backend", a.backend]
        if a.model_path:
            worker_args += ["--model-path", a.model_path]
        if a.models:
            worker_args += ["--models", a.models]
        stack.spawn("worker", "worker", worker_args, env)
        host = "127.0.0.1" if a.host in {"0.0.0.0", "::"} else a.host
        base = f"http://{host}:{a.port}"
        models = _wait_ready(base, admin_key, stack, time.monotonic() + READY_TIMEOUT)
        print(
            f"\nTokenyard is up.\n  OpenAI base URL: {base}/v1\n  API key:         {admin_key}\n"
            f"  models:          {', '.join(models)}\n  NATS:            {nats_url}\nCtrl-C stops it.\n",
            file=sys.stderr,
            flush=True,
        )
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
        stack.stop()
