"""NATS authentication as users run it: connections without valid credentials are refused, each
operator role is held to its own subjects, and `tokenyard up` runs authenticated, accepts a
remote node (token, join, list, disable from the CLI) and serves NATS and the API over TLS."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import openai
import pytest
import trustme

from broker_api.nats_auth import AuthDir
from schemas import subjects
from tests.enrol import admin, create_token, raw_join
from tests.helpers import CLI, ECHO, tokenyard
from tests.stack import Stack, free_port


async def test_no_or_wrong_credentials_are_refused(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.start_nats()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(stack.nats_url, allow_reconnect=False, connect_timeout=2)
        stranger = AuthDir.init(
            tmp_path / "another-operator"
        )  # valid JWTs, from an operator this server does not trust
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(
                stack.nats_url,
                user_credentials=str(stranger.path / "creds" / "api.creds"),
                allow_reconnect=False,
                connect_timeout=2,
            )
        ok = await nats.connect(stack.nats_url, user_credentials=stack.creds("api"))
        await ok.close()
    finally:
        await stack.close()


async def _violations(url: str, creds: str, *, publish: list[str], subscribe: list[str]) -> str:
    seen: list[str] = []

    async def on_error(e: Exception) -> None:
        seen.append(str(e))

    nc = await nats.connect(url, user_credentials=creds, error_cb=on_error)
    try:
        for subject in subscribe:
            await nc.subscribe(subject)
        for subject in publish:
            await nc.publish(subject, b"{}")
        await nc.flush()
        deadline = time.monotonic() + 5
        while len(seen) < len(publish) + len(subscribe) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    return "\n".join(seen).lower()


async def test_each_operator_role_is_held_to_its_own_subjects(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    assert stack.auth is not None
    AuthDir.init(stack.auth.path, adapters={"openai": ("gpt-4o",)})  # adds adapter-openai.creds
    stack.start_nats()
    try:
        denied: dict[str, tuple[list[str], list[str]]] = {
            "scheduler": (  # no API keys, no usage it did not settle, no audit log, no node stops
                [f"$KV.{subjects.KEYS_BUCKET}.x", f"$JS.API.DIRECT.GET.KV_{subjects.KEYS_BUCKET}", "ty.audit.x"],
                [subjects.REPLY_ANY, subjects.node_control("n1")],
            ),
            "ledger": (  # reads usage and audit; places and answers nothing
                [subjects.work_subject("own", ECHO), subjects.SCHED_SUBMIT, f"$KV.{subjects.NODES_BUCKET}.x"],
                [subjects.FLEET_HEARTBEAT_ALL, subjects.SCHED_SUBMIT],
            ),
            "adapter-openai": (  # its own pool's consumers only; no control plane
                [
                    subjects.js_consumer_create(
                        subjects.WORK_STREAM, subjects.work_consumer("own", ECHO), subjects.work_subject("own", ECHO)
                    ),
                    subjects.SCHED_SUBMIT,
                    f"$JS.API.STREAM.INFO.{subjects.WORK_STREAM}",
                    f"$KV.{subjects.ROUTING_BUCKET}.x",
                ],
                [subjects.pool_inboxes("own"), "_INBOX.>", subjects.SCHED_SUBMIT],
            ),
            "api": (  # everything of the gateway's, but not the schedulers' counters or the system account
                [f"$KV.{subjects.LIMITS_BUCKET}.x", subjects.SYS_CLAIMS_UPDATE, subjects.INTAKE_ALL.replace(">", "x")],
                [subjects.SCHED_SUBMIT, subjects.pool_inboxes("own")],
            ),
        }
        for role, (publish, subscribe) in denied.items():
            text = await _violations(stack.nats_url, stack.creds(role), publish=publish, subscribe=subscribe)
            for subject in publish:
                assert f'permissions violation for publish to "{subject.lower()}"' in text, (role, subject, text)
            for subject in subscribe:
                assert f'permissions violation for subscription to "{subject.lower()}"' in text, (role, subject, text)
    finally:
        await stack.close()


async def _refused(url: str, creds: str) -> bool:
    try:
        nc = await nats.connect(url, user_credentials=creds, allow_reconnect=False, connect_timeout=2)
    except nats.errors.Error as e:
        return "authorization violation" in str(e).lower()
    await nc.close()
    return False


async def test_credentials_auth_init_replaces_are_refused_on_the_running_server(tmp_path: Path) -> None:
    """Run again with other models, `auth init` issues the adapter new credentials and revokes
    the user of the old file (its grant may be wider: `--adapters NAME` reached every pool), and
    a gateway pushes that with the nodes' revocations: the old file's connection is closed and
    refused, the new file connects, and a node change later does not lift it."""
    stack = Stack(tmp_path)
    assert stack.auth is not None
    AuthDir.init(stack.auth.path, adapters={"prov-b": (ECHO,)})
    stack.start_nats()
    old = tmp_path / "adapter-prov-b.old.creds"
    shutil.copy(stack.creds("adapter-prov-b"), old)
    held = await nats.connect(stack.nats_url, user_credentials=str(old), allow_reconnect=False, connect_timeout=2)
    try:
        AuthDir.init(stack.auth.path, adapters={"prov-b": ("prov-model",)})
        assert old.read_text() != Path(stack.creds("adapter-prov-b")).read_text()
        url = await stack.start_api()  # pushes what the auth dir revokes when it starts
        deadline = time.monotonic() + 10
        while not held.is_closed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert held.is_closed, "the replaced credentials' connection is still open"
        assert await _refused(stack.nats_url, str(old))
        assert not await _refused(stack.nats_url, stack.creds("adapter-prov-b"))
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:  # a node's revocation keeps it
            token = await create_token(http, pool="lab", models=[ECHO])
            node = await raw_join(http, token["token"], [ECHO])
            r = await admin(http, "POST", f"/nodes/{node['node_id']}/disable")
            assert r.status_code == 200, r.text
        assert await _refused(stack.nats_url, str(old))
        assert not await _refused(stack.nats_url, stack.creds("adapter-prov-b"))
    finally:
        if not held.is_closed:
            await held.close()
        await stack.close()


# --- tokenyard up ----------------------------------------------------------------------------


class Up:
    """`tokenyard up --backend echo` as its own process, with its own data dir and ports."""

    def __init__(self, tmp: Path, *extra: str, scheme: str = "http") -> None:
        self.data = tmp / "data"
        self.port, self.nats_port = free_port(), free_port()
        self.log = tmp / "up.log"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        argv = [*CLI, "up", "--backend", "echo", "--port", str(self.port), "--data-dir", str(self.data)]
        argv += ["--nats-listen", f"127.0.0.1:{self.nats_port}", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    async def ready(self) -> str:
        deadline = time.monotonic() + 90
        while "Tokenyard is up" not in self.log.read_text() and time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            await asyncio.sleep(0.2)
        assert "Tokenyard is up" in self.log.read_text(), self.log.read_text()
        return (self.data / "admin_key").read_text().strip()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def cli(up: Up, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = tokenyard(*args, env={"TOKENYARD_API_URL": up.url, "TOKENYARD_DATA_DIR": str(up.data), **env}, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


async def test_up_runs_authenticated_and_accepts_a_remote_node(tmp_path: Path) -> None:
    up = Up(tmp_path)
    spawned: list[subprocess.Popen[bytes]] = []
    try:
        key = await up.ready()
        nats_url = f"nats://127.0.0.1:{up.nats_port}"
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(nats_url, allow_reconnect=False, connect_timeout=2)
        for role in ("api", "scheduler", "worker", "ledger", "sys"):
            assert os.stat(up.data / "creds" / f"{role}.creds").st_mode & 0o077 == 0
        assert os.stat(up.data / "nats-keys.json").st_mode & 0o077 == 0

        # a second worker on this machine with the same data dir finds its credentials there
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
        env.update(TOKENYARD_LOG_LEVEL="warning", TOKENYARD_HEARTBEAT="0.2")
        local = ["-m", "worker", "--backend", "echo", "--models", "local-extra", "--data-dir", str(up.data)]
        spawned.append(subprocess.Popen([CLI[0], *local, "--nats-url", nats_url], env=env))

        # a remote machine: a token from the CLI, `worker join` with its own data dir
        made = cli(up, "nodes", "token", "create", "--pool", "lab", "--kind", "own", "--ttl", "10m")
        token = next(line.split()[1] for line in made.stdout.splitlines() if line.startswith("token:"))
        assert f"tokenyard worker join --server {up.url} --token {token}" in made.stdout
        remote = tmp_path / "remote-machine"
        join = ["-m", "worker", "join", "--server", up.url, "--token", token, "--backend", "echo"]
        spawned.append(subprocess.Popen([CLI[0], *join, "--data-dir", str(remote)], env=env))

        async with openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key=key, max_retries=0, timeout=30) as client:
            deadline = time.monotonic() + 60
            listed: dict[str, Any] = {}
            while time.monotonic() < deadline:
                listed = json.loads(cli(up, "nodes", "list", "--format", "json").stdout)
                models = {m.id for m in (await client.models.list()).data}
                if [n["state"] for n in listed["data"]] == ["online"] and "local-extra" in models:
                    break
                await asyncio.sleep(0.3)
            [node] = listed["data"]
            assert (node["pool"], node["kind"], node["models"]) == ("lab", "own", [ECHO])
            table = cli(up, "nodes", "list").stdout
            assert node["id"] in table and "online" in table
            r = await client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "remote"}], extra_body={"provider": {"only": ["lab"]}}
            )
            assert r.choices[0].message.content.startswith("remote")
            r = await client.chat.completions.create(
                model="local-extra", messages=[{"role": "user", "content": "here"}]
            )
            assert r.choices[0].message.content.startswith("here")

            shown = cli(up, "nodes", "show", node["id"]).stdout
            assert "served:" in shown and ECHO in shown
            assert "disabled" in cli(up, "nodes", "disable", node["id"]).stdout
            assert spawned[1].wait(30) == 3  # cut off: NATS closed it for good
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(
                    model=ECHO, messages=[{"role": "user", "content": "x"}], extra_body={"provider": {"only": ["lab"]}}
                )
            assert e.value.status_code == 503
    finally:
        for p in spawned:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        code = up.stop()
    assert code == 0, up.log.read_text()


async def test_up_serves_nats_and_the_api_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {}
    for name, blob in (
        ("ca.pem", ca.cert_pem),
        ("cert.pem", cert.cert_chain_pems[0]),
        ("key.pem", cert.private_key_pem),
    ):
        files[name] = tmp_path / name
        blob.write_to_path(str(files[name]))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    tls = ["--tls-cert", str(chain), "--tls-key", str(files["key.pem"])]
    tls += [
        "--nats-tls-cert",
        str(chain),
        "--nats-tls-key",
        str(files["key.pem"]),
        "--nats-tls-ca",
        str(files["ca.pem"]),
    ]
    up = Up(tmp_path, *tls, scheme="https")
    spawned: list[subprocess.Popen[bytes]] = []
    try:
        key = await up.ready()
        assert f"tls://127.0.0.1:{up.nats_port}" in up.log.read_text()
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # TLS, but no credentials
            await nats.connect(f"tls://127.0.0.1:{up.nats_port}", tls=ctx, allow_reconnect=False, connect_timeout=2)
        with pytest.raises(httpx.TransportError):  # no plain HTTP on the API's port
            httpx.get(up.url.replace("https", "http") + "/healthz", timeout=5).raise_for_status()

        async with httpx.AsyncClient(base_url=up.url, verify=ctx, timeout=30) as http:
            made = await http.post(
                "/v1/admin/nodes/tokens", headers={"Authorization": f"Bearer {key}"}, json={"pool": "lab"}
            )
            assert made.status_code == 201, made.text
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
        env.update(TOKENYARD_LOG_LEVEL="warning", TOKENYARD_HEARTBEAT="0.2")
        join = ["-m", "worker", "join", "--server", up.url, "--token", made.json()["token"], "--backend", "echo"]
        join += ["--server-ca", str(files["ca.pem"]), "--nats-tls-ca", str(files["ca.pem"])]
        spawned.append(subprocess.Popen([CLI[0], *join, "--data-dir", str(tmp_path / "remote")], env=env))
        client = openai.AsyncOpenAI(
            base_url=f"{up.url}/v1", api_key=key, max_retries=0, timeout=30, http_client=httpx.AsyncClient(verify=ctx)
        )
        async with client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    r = await client.chat.completions.create(
                        model=ECHO,
                        messages=[{"role": "user", "content": "tls"}],
                        extra_body={"provider": {"only": ["lab"]}},
                    )
                    break
                except openai.APIStatusError:
                    assert spawned[0].poll() is None
                    await asyncio.sleep(0.3)
            assert r.choices[0].message.content.startswith("tls")
    finally:
        for p in spawned:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        code = up.stop()
    assert code == 0, up.log.read_text()
