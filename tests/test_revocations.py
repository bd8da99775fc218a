"""An operator's revocation reaches NATS servers that are already running: `tokenyard auth init`
pushes it itself when it can reach NATS, and a running gateway holding the auth dir pushes it
when the revocations file changes. Neither nats-server nor the gateway restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import httpx
import nats
import nats.errors
from nats.aio.client import Client as NATS

from broker_api.enrolment import Credentials
from broker_api.nats_auth import AuthDir
from schemas import subjects
from schemas.settings import NatsSettings, creds_path
from tests.cluster import NatsCluster
from tests.enrol import admin, create_token, creds_file, raw_join
from tests.helpers import CLI, ECHO
from tests.stack import Stack, free_port

BOUND = 10.0  # seconds a revocation may take to close a connection (the gateway looks every 2 s)


async def _auth_init(*args: str) -> str:
    """`tokenyard auth init` as its own process: what it printed (it must succeed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
    proc = await asyncio.create_subprocess_exec(
        *CLI, "auth", "init", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()  # the one we started
        await proc.wait()
        raise
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def _held_adapter(tmp_path: Path) -> tuple[Stack, Path, NATS]:
    """An auth dir with adapter `prov-b`, a running nats-server on it, a copy of the adapter's
    credentials as they are now (`old`: what `auth init` will replace) and a connection held
    with them."""
    stack = Stack(tmp_path)
    assert stack.auth is not None
    await _auth_init("--out", str(stack.auth.path), "--adapter", f"prov-b={ECHO}")
    stack.start_nats()
    old = tmp_path / "adapter-prov-b.old.creds"
    shutil.copy(stack.creds("adapter-prov-b"), old)
    return stack, old, await _connect(stack.nats_url, str(old))


async def _connect(url: str, creds: str, inbox: str = "") -> NATS:
    return await nats.connect(
        url,
        user_credentials=creds,
        allow_reconnect=False,
        connect_timeout=2,
        **({"inbox_prefix": inbox} if inbox else {}),
    )


async def _refused(url: str, creds: str, inbox: str = "") -> bool:
    try:
        nc = await _connect(url, creds, inbox)
    except nats.errors.Error as e:
        return "authorization violation" in str(e).lower()
    await nc.close()
    return False


async def _closed_within(nc: NATS, bound: float) -> float:
    """Seconds until the server closed `nc` (asserting it does within `bound`)."""
    start = time.monotonic()
    while not nc.is_closed and time.monotonic() - start < bound:
        await asyncio.sleep(0.05)
    assert nc.is_closed, f"the replaced credentials' connection is still open after {bound} s"
    return time.monotonic() - start


async def test_auth_init_pushes_the_revocation_to_the_running_nats_itself(tmp_path: Path) -> None:
    """No gateway runs: `auth init`, pointed at the running server, closes the replaced
    credentials' connection and says so, and keeps the revocations the server held already (a
    node a gateway disabled), at a restart too."""
    stack, old, held = await _held_adapter(tmp_path)
    assert stack.auth is not None
    node_creds, node_user = stack.auth.issue("node-x", None)  # as if a gateway had disabled this node
    (tmp_path / "node.creds").write_text(node_creds)
    gateway = await Credentials.open(stack.auth, NatsSettings(url=stack.nats_url))
    try:
        await gateway.push({node_user: int(time.time())})
        assert await _refused(stack.nats_url, str(tmp_path / "node.creds"))

        out = await _auth_init(
            "--out", str(stack.auth.path), "--adapter", "prov-b=prov-model", "--nats-url", stack.nats_url
        )
        assert f"Revoked the 1 credentials issued again here: NATS at {stack.nats_url} refuses them now" in out, out
        await _closed_within(held, BOUND)
        assert await _refused(stack.nats_url, str(old))
        assert not await _refused(stack.nats_url, stack.creds("adapter-prov-b"))  # the new file connects
        assert await _refused(stack.nats_url, str(tmp_path / "node.creds"))  # the node's revocation kept

        # restarted on the nats-auth.conf auth init rewrote, whose preload lists only the operator's
        # revocations: the server keeps what was pushed (dated after that preload, never tied with it)
        assert stack.nats is not None
        port = stack.nats.port
        stack.nats.stop()
        stack.nats = stack.nats_server(port=port).start()
        assert await _refused(stack.nats_url, str(old))
        assert await _refused(stack.nats_url, str(tmp_path / "node.creds"))
    finally:
        await gateway.close()
        if not held.is_closed:
            await held.close()
        await stack.close()


async def test_a_running_gateway_pushes_a_revocation_auth_init_could_not(stack: Stack) -> None:
    """`auth init` cannot reach NATS (pointed at a port nothing listens on) and says what will
    make the servers refuse the old file; the gateway holding the directory sees the new
    revocation and pushes it with the registry's, within a few seconds, without restarting."""
    assert stack.auth is not None
    url = await stack.start_api()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        token = await create_token(http, pool="lab", models=[ECHO])
        node = await raw_join(http, token["token"], [ECHO])
        assert (await admin(http, "POST", f"/nodes/{node['node_id']}/disable")).status_code == 200
        node_path = creds_file(stack, node)
        node_inbox = subjects.worker_inbox("lab", node["node_id"])
        assert await _refused(stack.nats_url, node_path, node_inbox)

        await _auth_init("--out", str(stack.auth.path), "--adapter", f"prov-b={ECHO}", "--nats-url", stack.nats_url)
        old = stack.tmp / "adapter-prov-b.old.creds"
        shutil.copy(stack.creds("adapter-prov-b"), old)
        held = await _connect(stack.nats_url, str(old))
        try:
            nowhere = f"nats://127.0.0.1:{free_port()}"
            out = await _auth_init(
                "--out", str(stack.auth.path), "--adapter", "prov-b=prov-model", "--nats-url", nowhere
            )
            assert "Revoked the 1 credentials issued again here, but the running NATS may still accept them" in out
            assert f"could not connect to NATS at {nowhere}" in out and "once a gateway that holds" in out, out
            took = await _closed_within(held, BOUND)
            assert await _refused(stack.nats_url, str(old)), f"closed after {took:.1f} s but accepted again"
            assert not await _refused(stack.nats_url, stack.creds("adapter-prov-b"))
            assert await _refused(stack.nats_url, node_path, node_inbox)  # the registry's revocation kept
            assert (await http.get("/healthz")).status_code == 200  # the same gateway, still serving
        finally:
            if not held.is_closed:
                await held.close()


async def test_auth_init_run_again_pushes_what_the_servers_lack(tmp_path: Path) -> None:
    """No gateway holds the directory and `auth init` could not reach NATS when it revoked: the
    old file still connects. Run again with the same flags where NATS is reachable, it pushes
    the earlier revocation, and says so; a third run finds nothing to add."""
    stack, old, held = await _held_adapter(tmp_path)
    assert stack.auth is not None
    flags = ["--out", str(stack.auth.path), "--adapter", "prov-b=prov-model"]
    try:
        out = await _auth_init(*flags, "--nats-url", f"nats://127.0.0.1:{free_port()}")
        assert "may still accept them" in out and "Connection refused" in out, out
        assert not held.is_closed and not await _refused(stack.nats_url, str(old))  # nothing reached the server

        out = await _auth_init(*flags, "--nats-url", stack.nats_url)
        assert f"The 1 credentials revoked here earlier: NATS at {stack.nats_url} refuses them now" in out, out
        await _closed_within(held, BOUND)
        assert await _refused(stack.nats_url, str(old))
        out = await _auth_init(*flags, "--nats-url", stack.nats_url)
        assert f"The 1 credentials revoked here earlier: NATS at {stack.nats_url} refuses them." in out, out
    finally:
        if not held.is_closed:
            await held.close()
        await stack.close()


async def test_auth_init_pushed_to_one_server_is_refused_on_every_server_of_a_cluster(tmp_path: Path) -> None:
    """Three servers, each with its own resolver dir: `auth init` pointed at the first closes
    the replaced credentials' connection on the third and every server refuses them."""
    auth = await _init_dir(tmp_path / "auth")
    admin_creds = tmp_path / "admin.creds"
    admin_creds.write_text(auth.issue("test-admin", None)[0])
    cluster = NatsCluster(tmp_path / "cluster", auth=auth, creds=str(admin_creds)).start()
    old = tmp_path / "adapter-prov-b.old.creds"
    shutil.copy(creds_path(auth.path, "adapter-prov-b"), old)
    held: NATS | None = None
    try:
        await cluster.wait_for_jetstream()  # its meta leader elected: the routes are up
        held = await _connect(cluster.urls[2], str(old))
        flags = ["--out", str(auth.path), "--adapter", "prov-b=prov-model"]
        out = await _auth_init(*flags, "--nats-url", cluster.urls[0])
        assert f"NATS at {cluster.urls[0]} refuses them now" in out, out
        await _closed_within(held, BOUND)
        for url in cluster.urls:
            deadline = time.monotonic() + BOUND
            while not await _refused(url, str(old)) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await _refused(url, str(old)), f"{url} still accepts the replaced credentials"
            assert not await _refused(url, str(creds_path(auth.path, "adapter-prov-b")))
    finally:
        if held is not None and not held.is_closed:
            await held.close()
        cluster.stop()


async def _init_dir(path: Path) -> AuthDir:
    await _auth_init("--out", str(path), "--adapter", f"prov-b={ECHO}")
    auth = AuthDir.open(path)
    assert auth is not None
    return auth
