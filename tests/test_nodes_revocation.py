"""Revocations converge: nodes disabled at the same moment through different gateways all end
up refused, though each gateway pushes a whole account JWT built from what it read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from broker_api.nats_auth import AuthDir
from schemas import subjects
from tests.enrol import admin, create_token, creds_file, raw_join
from tests.helpers import ECHO
from tests.stack import Stack
from tests.test_nodes import eventually

LAB = "lab"
NODES = 8
ROUNDS = 3


async def _connect(url: str, creds: str, node: str) -> NATS:
    return await nats.connect(
        url,
        user_credentials=creds,
        inbox_prefix=subjects.worker_inbox(LAB, node),
        allow_reconnect=False,
        connect_timeout=2,
    )


async def _listed(http: httpx.AsyncClient, node: str) -> bool:
    return (await admin(http, "GET", f"/nodes/{node}")).status_code == 200


async def test_nodes_disabled_at_once_through_two_gateways_are_all_refused(stack: Stack, tmp_path: Path) -> None:
    gateways = [await stack.start_api(), await stack.start_api(ledger=False, data_dir=str(tmp_path / "gw2"))]
    clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in gateways]
    conns: list[NATS] = []
    try:
        token = await create_token(clients[0], pool=LAB, models=[ECHO], uses=NODES * ROUNDS)
        for round_ in range(ROUNDS):  # the race is a matter of timing: several rounds of it
            joined = [await raw_join(clients[0], token["token"], [ECHO]) for _ in range(NODES)]
            files = {j["node_id"]: creds_file(stack, j) for j in joined}
            conns = [await _connect(stack.nats_url, files[node], node) for node in files]
            for http in clients:  # both gateways' registries hold every node
                for node in files:
                    await eventually(lambda: _listed(http, node))

            answers = await asyncio.gather(
                *(admin(clients[i % 2], "POST", f"/nodes/{node}/disable") for i, node in enumerate(files))
            )
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]

            deadline = time.monotonic() + 5
            while not all(nc.is_closed for nc in conns) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            open_ = [node for node, nc in zip(files, conns) if not nc.is_closed]
            assert not open_, f"round {round_}: still connected after disabling: {open_}"
            for node, path in files.items():  # and their credentials are refused from now on
                with pytest.raises(nats.errors.Error):
                    refused = await _connect(stack.nats_url, path, node)
                    await refused.close()
                    raise AssertionError(f"round {round_}: {node}'s credentials still accepted")
    finally:
        for nc in conns:
            if not nc.is_closed:
                await nc.close()
        for http in clients:
            await http.aclose()


async def test_a_disabled_node_stays_refused_when_nats_restarts_on_a_rewritten_config(stack: Stack) -> None:
    """`auth init` run again (as every `tokenyard up` start does) rewrites nats-auth.conf; a
    nats-server restarted with it keeps the account JWT a gateway pushed since, so the nodes
    it revoked stay refused."""
    assert stack.auth is not None
    url = await stack.start_api()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        token = await create_token(http, pool=LAB, models=[ECHO])
        joined = await raw_join(http, token["token"], [ECHO])
        assert (await admin(http, "POST", f"/nodes/{joined['node_id']}/disable")).status_code == 200
    path = creds_file(stack, joined)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await _connect(stack.nats_url, path, joined["node_id"])
    AuthDir.init(stack.auth.path, adapters={"prov-b": (ECHO,)})  # nothing replaced: the same preload as before
    assert stack.nats is not None
    port = stack.nats.port
    stack.nats.stop()
    stack.nats = stack.nats_server(port=port).start()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        refused = await _connect(stack.nats_url, path, joined["node_id"])
        await refused.close()
