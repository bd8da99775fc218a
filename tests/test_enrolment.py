"""Enrolment end to end: a second machine joins with a token, serves its pool through the
official openai SDK, keeps its identity across restarts; bad tokens get clear 4xx answers."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import httpx
import nats
import openai
import pytest

from broker_api.nats_auth import AuthDir, write_secret
from broker_api.nats_jwt import USER, Key, creds, user_jwt
from schemas import subjects
from schemas.permissions import node
from tests.enrol import admin, create_token, join_node, wait_for_node
from tests.helpers import ECHO
from tests.stack import ADMIN_KEY, Stack

LAB = "lab"


@pytest.fixture
async def gateway(stack: Stack) -> Stack:
    """The stack with its API (auth dir and all) but no worker yet."""
    await stack.start_api()
    return stack


async def test_a_second_machine_joins_serves_its_pool_and_keeps_its_identity(gateway: Stack, tmp_path: Path) -> None:
    node_dir = tmp_path / "second-machine"
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as http:
        token = await create_token(http, pool=LAB, kind="own", models=[ECHO], ttl=600, uses=1)
        assert token["token"].startswith("tyj_") and token["pool"] == LAB
        listed = (await admin(http, "GET", "/nodes/tokens")).json()["data"]
        assert [t["id"] for t in listed] == [token["id"]] and "token" not in listed[0]  # no secret twice
        proc = join_node(gateway, gateway.api_url, node_dir, token=token["token"])
        node = await wait_for_node(http)
        assert (node["pool"], node["kind"], node["models"], node["org"]) == (LAB, "own", [ECHO], "default")
        assert node["slots"]["total"] > 0 and node["last_seen"]
        # stored 0600, and the secret is not in its log
        for name in ("node.json", "creds/node.creds"):
            assert stat.S_IMODE(os.stat(node_dir / name).st_mode) == 0o600
        assert (node_dir / "node_id").read_text().strip() == node["id"]
        assert token["token"] not in proc.output()
        creds_seed = (node_dir / "creds" / "node.creds").read_text().split("NKEY SEED-----\n")[1].split("\n")[0]
        assert creds_seed not in proc.output()

        await gateway.wait_for_model(ECHO)
        async with openai.AsyncOpenAI(
            base_url=f"{gateway.api_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30
        ) as client:
            r = await client.chat.completions.create(
                model=ECHO,
                messages=[{"role": "user", "content": "served by the lab"}],
                max_tokens=4,
                extra_body={"provider": {"only": [LAB]}},
            )
            assert r.choices[0].message.content == "served by the lab"

        # the ledger says which node served it, and the owner sees it
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            usage = (await admin(http, "GET", f"/nodes/{node['id']}/usage")).json()["data"]
            if usage:
                break
            await asyncio.sleep(0.1)
        assert [(u["model"], u["requests"]) for u in usage] == [(ECHO, 1)]
        assert (await admin(http, "GET", f"/nodes/{node['id']}")).json()["requests"] == 1

        # restarted without the token (spent anyway): the same node
        assert proc.stop() == 0
        again = join_node(gateway, gateway.api_url, node_dir)
        back = await wait_for_node(http, node_id=node["id"])
        assert back["id"] == node["id"]
        assert len((await admin(http, "GET", "/nodes")).json()["data"]) == 1
        assert "reusing the identity stored in" in again.output() and "joined" in proc.output()

        audit = (await admin(http, "GET", "/audit")).json()["data"]
        assert {"node.token.create", "node.enrol"} <= {e["action"] for e in audit}


async def _join(http: httpx.AsyncClient, token: str, models: list[str] | None = None) -> httpx.Response:
    return await http.post("/v1/nodes/join", json={"token": token, "models": models or [ECHO]})


async def test_unknown_expired_and_used_up_tokens_are_refused_clearly(gateway: Stack) -> None:
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as http:
        r = await _join(http, "tyj_nothere_secret")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token", r.text
        r = await http.post("/v1/nodes/join", json={"models": [ECHO]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "token"

        once = await create_token(http, pool=LAB, uses=1)
        first = await _join(http, once["token"])
        assert first.status_code == 200, first.text
        assert first.json()["creds"].startswith("-----BEGIN NATS USER JWT-----")
        second = await _join(http, once["token"])
        assert second.status_code == 401, second.text
        assert second.json()["error"]["code"] == "token_used_up"
        assert "used up (1 of 1 joins)" in second.json()["error"]["message"]

        brief = await create_token(http, pool=LAB, ttl=1)
        await asyncio.sleep(1.2)
        late = await _join(http, brief["token"])
        assert late.status_code == 401 and late.json()["error"]["code"] == "token_expired", late.text
        assert "expired" in late.json()["error"]["message"]

        tampered = once["token"][:-2] + ("AA" if not once["token"].endswith("AA") else "BB")
        assert (await _join(http, tampered)).json()["error"]["code"] == "invalid_token"


async def test_models_a_token_does_not_allow_are_refused(gateway: Stack) -> None:
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as http:
        token = await create_token(http, pool=LAB, models=["a-model"], uses=5)
        r = await _join(http, token["token"], ["another-model"])
        assert r.status_code == 400 and r.json()["error"]["param"] == "models"
        both = await _join(http, token["token"], ["a-model", "another-model"])
        assert both.status_code == 200 and both.json()["models"] == ["a-model"]


async def test_joins_are_rate_limited_per_address(stack: Stack) -> None:
    await stack.start_api(join_rate=3)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        codes = [(await _join(http, f"tyj_guess{i}_x")).status_code for i in range(5)]
        assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429]
        r = await _join(http, "tyj_guess_x")
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"]


async def test_operator_pools_take_no_enrolled_nodes(stack: Stack) -> None:
    await stack.start_api(reserved_pools="vip")
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        r = await admin(http, "POST", "/nodes/tokens", json={"pool": "vip"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "pool", r.text
        r = await admin(http, "POST", "/nodes/tokens", json={"pool": "Not A Pool"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "pool"


async def test_a_node_enrolled_for_256_long_model_ids_connects_and_serves_them(gateway: Stack, tmp_path: Path) -> None:
    """256 models of 100 characters give a node a ~230 KB user JWT: more than the 64 KiB CONNECT
    line the NATS config used to allow. Far longer ones are refused at enrolment, clearly, and
    the token is still good."""
    many = [f"org-{i:03d}/" + "m" * 92 for i in range(256)]
    assert {len(m) for m in many} == {100}
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=60) as http:
        named = await admin(http, "POST", "/nodes/tokens", json={"pool": LAB, "models": [m * 12 for m in many]})
        assert named.status_code == 400 and named.json()["error"]["code"] == "too_many_models", named.text[:300]
        token = await create_token(http, pool=LAB, kind="own", ttl=600, uses=1)
        huge = await _join(http, token["token"], [m * 12 for m in many])
        assert huge.status_code == 400, huge.text[:300]
        error = huge.json()["error"]
        assert (error["param"], error["code"]) == ("models", "too_many_models") and "fewer models" in error["message"]
        proc = join_node(
            gateway,
            gateway.api_url,
            tmp_path / "node",
            "--models",
            ",".join(many),
            token=token["token"],
            TOKENYARD_SLOTS="256",
        )
        node = await wait_for_node(http, timeout=90)
        assert node["models"] == many, proc.output()
        # (a slot per model: with fewer slots than models the worker keeps pulls standing for
        # only as many models as it has slots, and the rest wait)
        await gateway.wait_for_model(many[200], timeout=60)
        async with openai.AsyncOpenAI(
            base_url=f"{gateway.api_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30
        ) as client:
            r = await client.chat.completions.create(
                model=many[200], messages=[{"role": "user", "content": "from the long list"}], max_tokens=4
            )
        assert r.choices[0].message.content == "from the long list"
        assert "maximum control line" not in proc.output().lower()  # nats-server says it in lower case


async def test_a_nats_on_an_older_config_gets_no_node_it_would_refuse(tmp_path: Path) -> None:
    """An auth dir whose nats-auth.conf still allows an older `auth init`'s 64 KiB: a join whose
    credentials would pass it is refused before its token is spent, one that fits connects to that
    server, and a worker holding credentials the server refuses says why once, not only 'Connection lost'."""
    stack = Stack(tmp_path)
    assert stack.auth is not None
    conf = stack.auth.conf_path.read_text()
    assert "max_control_line: 1048576" in conf
    stack.auth.conf_path.write_text(conf.replace("max_control_line: 1048576", "max_control_line: 65536"))
    stack.start_nats()
    models = [f"org-{i:03d}/" + "m" * 92 for i in range(80)]  # ~70 KB of credentials: fine for 1 MiB, not 64 KiB
    try:
        url = await stack.start_api()
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            token = await create_token(http, pool=LAB, kind="own", ttl=600, uses=1)
            too_long = await _join(http, token["token"], models)
            assert too_long.status_code == 400, too_long.text[:300]
            error = too_long.json()["error"]
            assert error["code"] == "too_many_models" and "61440" in error["message"], error
            fits = await _join(http, token["token"], models[:66])  # the token is still good
            assert fits.status_code == 200, fits.text[:300]
        joined = fits.json()
        path = tmp_path / "fits.creds"
        write_secret(path, joined["creds"])
        assert len(joined["creds"]) > 55_000  # close to the limit: the margin is enough for a real connect
        nc = await nats.connect(
            stack.nats_url,
            user_credentials=str(path),
            inbox_prefix=subjects.worker_inbox(LAB, joined["node_id"]),
            allow_reconnect=False,
            connect_timeout=5,
        )
        await nc.close()

        user = Key.new(USER)  # what a gateway without the cap handed out: the server refuses its connect
        jwt = user_jwt(stack.auth.keys.account, user.public, name="node-x", permissions=node("nd-x", LAB, models))
        write_secret(tmp_path / "long.creds", creds(jwt, user.seed))
        stranger = AuthDir.init(tmp_path / "another-operator", local_worker=True)  # and credentials it never trusts
        workers = {
            "maximum control line exceeded": stack.start_worker(
                TOKENYARD_NATS_CREDS=str(tmp_path / "long.creds"), TOKENYARD_POOL=LAB
            ),
            "authorization violation": stack.start_worker(
                TOKENYARD_NATS_CREDS=str(stranger.path / "creds" / "worker.creds"),
                TOKENYARD_DATA_DIR=str(tmp_path / "w2"),
            ),
        }
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(w in p.output().lower() for w, p in workers.items()):
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # they retry every 0.5 s: several more refusals each
        for why, worker in workers.items():
            lines = [ln for ln in worker.output().splitlines() if "worker.connect_refused" in ln]
            assert len(lines) == 1 and why in lines[0].lower(), worker.output()[-2000:]
    finally:
        await stack.close()
