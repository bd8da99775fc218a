"""`tokenyard worker join --server URL --token T [--data-dir DIR] [worker flags]`: enrol this
machine with a gateway, then serve as `tokenyard worker` would.

The first run trades the enrolment token over HTTP(S) (`POST /v1/nodes/join`) for the node's
identity: a stable node id, its pool, kind and models, the NATS URL to use and its own NATS
credentials. They are stored in the data dir (`node.json`, `creds/node.creds`, both 0600; the
node id also in `node_id`, where a plain `tokenyard worker` finds its id), and the secret is
never logged. Later runs reuse the stored identity: the same node id, no token needed. The
worker then serves its enrolled pool and models with those credentials; every other worker flag
(`--backend`, `--model-path`, `--slots`, ...) works as for `tokenyard worker`.

This module talks HTTP to the gateway and NATS to the rest; it imports nothing of broker_api.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from schemas.logs import configure_logging, run
from schemas.registry import ENROLLED_KINDS
from schemas.settings import add_setting, creds_path
from worker.backends import build_backend
from worker.main import serve
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

IDENTITY = "node.json"
NODE_ID = "node_id"
ROLE = "node"  # creds/node.creds
JOIN_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    org: str
    pool: str
    kind: str
    models: tuple[str, ...]
    nats_url: str
    server: str

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "models": list(self.models)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Identity:
        o = json.loads(text)
        return cls(
            node_id=str(o["node_id"]),
            org=str(o["org"]),
            pool=str(o["pool"]),
            kind=str(o["kind"]),
            models=tuple(str(m) for m in o["models"]),
            nats_url=str(o["nats_url"]),
            server=str(o.get("server", "")),
        )


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def load_identity(data_dir: str) -> Identity | None:
    path = Path(data_dir).expanduser() / IDENTITY
    if not path.is_file() or not creds_path(data_dir, ROLE).is_file():
        return None
    return Identity.from_json(path.read_text())


def store_identity(data_dir: str, identity: Identity, creds: str) -> None:
    data = Path(data_dir).expanduser()
    _write_secret(creds_path(data, ROLE), creds)
    _write_secret(data / IDENTITY, identity.to_json())
    (data / NODE_ID).write_text(identity.node_id + "\n")


def request_join(server: str, token: str, models: tuple[str, ...], *, verify: str | bool) -> tuple[Identity, str]:
    """Trade the token for an identity and credentials; a refusal exits with the gateway's message."""
    body = {"token": token, "models": list(models), "name": socket.gethostname()[:200]}
    try:
        r = httpx.post(f"{server.rstrip('/')}/v1/nodes/join", json=body, timeout=JOIN_TIMEOUT, verify=verify)
    except httpx.HTTPError as e:
        raise SystemExit(f"tokenyard worker join: cannot reach {server}: {e}") from e
    answer: dict[str, Any] = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code != 200:
        message = (answer.get("error") or {}).get("message") or r.text
        raise SystemExit(f"tokenyard worker join: the gateway refused: {r.status_code}: {message}")
    kind = str(answer["kind"])
    if kind not in ENROLLED_KINDS:
        raise SystemExit(f"tokenyard worker join: the gateway answered an unknown kind {kind!r}")
    identity = Identity(
        node_id=str(answer["node_id"]),
        org=str(answer["org"]),
        pool=str(answer["pool"]),
        kind=kind,
        models=tuple(str(m) for m in answer["models"]),
        nats_url=str(answer["nats_url"]),
        server=server,
    )
    return identity, str(answer["creds"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenyard worker join",
        description="Enrol this machine with a Tokenyard gateway, then serve. Other flags: `tokenyard worker --help`.",
    )
    add_setting(p, "--server", default="", help="the gateway's URL, e.g. https://gateway.example:8000")
    add_setting(p, "--token", default="", help="the enrolment token (only the first time)")
    add_setting(p, "--server-ca", default="", help="CA bundle for an https --server with a private CA")
    return p


def settings_for(base: WorkerSettings, identity: Identity, *, nats_url: str) -> WorkerSettings:
    """The worker's settings as this node: its id, pool, kind, models and credentials."""
    creds = str(creds_path(base.data_dir, ROLE))
    nats = dataclasses.replace(base.nats, url=nats_url, creds=creds)
    return dataclasses.replace(
        base,
        node_id=identity.node_id,
        pool=identity.pool,
        kind="volunteer" if identity.kind == "volunteer" else "own",
        models=identity.models,
        nats_url=nats_url,
        nats=nats,
    )


async def asked_models(base: WorkerSettings) -> tuple[str, ...]:
    """What this worker would serve: its --models, else its backend's defaults (not started)."""
    return base.models or tuple(m.id for m in (await build_backend(base)).models())


def main(argv: list[str]) -> None:
    a, rest = parser().parse_known_args(argv)
    base = WorkerSettings.from_args(rest)
    configure_logging(base.log_level, base.log_json)
    identity = load_identity(base.data_dir)
    how = f"reusing the identity stored in {base.data_dir}"
    if identity is None:
        if not (a.server and a.token):
            raise SystemExit("tokenyard worker join: this data dir holds no identity yet: pass --server and --token")
        verify: str | bool = a.server_ca or True
        identity, creds = request_join(a.server, a.token, run(asked_models(base)), verify=verify)
        store_identity(base.data_dir, identity, creds)
        log.info("node.joined", node=identity.node_id, org=identity.org, pool=identity.pool, models=identity.models)
        how = f"joined {a.server}; identity stored in {base.data_dir}"
    else:
        log.info("node.identity_reused", node=identity.node_id, pool=identity.pool, data_dir=base.data_dir)
    user_url = (
        "--nats-url" in rest or any(x.startswith("--nats-url=") for x in rest) or "TOKENYARD_NATS_URL" in os.environ
    )
    settings = settings_for(base, identity, nats_url=base.nats_url if user_url else identity.nats_url)
    print(
        f"tokenyard worker join: {how}\n  node {identity.node_id} (pool {identity.pool}, {identity.kind}, "
        f"models {', '.join(identity.models)}) serving through {settings.nats_url}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(run(serve(settings)))
