"""Test helpers for enrolled nodes: make tokens, join a second node as a user would, watch the
registry."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import nats

from broker_api.nats_auth import write_secret
from tests.stack import ADMIN_KEY, FAST_WORKER, Proc, Stack, auth_headers


async def admin(http: httpx.AsyncClient, method: str, path: str, key: str = ADMIN_KEY, **kw: Any) -> httpx.Response:
    return await http.request(method, f"/v1/admin{path}", headers=auth_headers(key), **kw)


async def create_token(http: httpx.AsyncClient, key: str = ADMIN_KEY, **body: Any) -> dict[str, Any]:
    r = await admin(http, "POST", "/nodes/tokens", key=key, json=body)
    assert r.status_code == 201, r.text
    token: dict[str, Any] = r.json()
    return token


def join_node(stack: Stack, server: str, data_dir: Path, *args: str, token: str = "", **env: str) -> Proc:
    """`tokenyard worker join` as its own process with its own data dir, the way a second
    machine runs it: nothing of the stack's NATS URL or credentials in its environment."""
    log = stack.tmp / f"join-{len(stack.procs)}.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
    full_env = {**base, **FAST_WORKER, "TOKENYARD_DATA_DIR": str(data_dir), **env}
    argv = [sys.executable, "-m", "worker", "join", "--server", server, *(["--token", token] if token else []), *args]
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    proc = Proc("join", popen, log)
    stack.procs.append(proc)
    return proc


async def node_view(http: httpx.AsyncClient, node_id: str, key: str = ADMIN_KEY) -> dict[str, Any]:
    r = await admin(http, "GET", f"/nodes/{node_id}", key=key)
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


async def wait_for_node(
    http: httpx.AsyncClient, *, state: str = "online", node_id: str = "", timeout: float = 30.0
) -> dict[str, Any]:
    """Until some node (or `node_id`) is listed in `state`; returns its view."""
    deadline = time.monotonic() + timeout
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        nodes = (await admin(http, "GET", "/nodes")).json()["data"]
        for n in nodes:
            if n["state"] == state and (not node_id or n["id"] == node_id):
                return n
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no node {node_id or ''} became {state} within {timeout} s: {nodes}")


async def connection_names(stack: Stack) -> list[str]:
    """The names of the clients connected to the stack's nats-server now (its connz, asked as
    the system account's user)."""
    assert stack.auth is not None
    nc = await nats.connect(stack.nats_url, user_credentials=str(stack.auth.sys_creds))
    try:
        reply = await nc.request("$SYS.REQ.SERVER.PING.CONNZ", json.dumps({"limit": 4096}).encode(), timeout=2)
    finally:
        await nc.close()
    return [c.get("name", "") for c in json.loads(reply.data)["data"]["connections"]]


async def raw_join(http: httpx.AsyncClient, token: str, models: list[str]) -> dict[str, Any]:
    """Join over HTTP as a node would (the answer holds the node's NATS credentials)."""
    r = await http.post("/v1/nodes/join", json={"token": token, "models": models})
    assert r.status_code == 200, r.text
    joined: dict[str, Any] = r.json()
    return joined


def creds_file(stack: Stack, joined: dict[str, Any]) -> str:
    path = stack.tmp / f"{joined['node_id']}.creds"
    write_secret(path, joined["creds"])
    return str(path)
