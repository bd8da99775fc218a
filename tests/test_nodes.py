"""The node registry on real processes: disable cuts a node off within 2 s and its jobs move,
enable lets it back, remove ends it; tenancy; the owner's price in `cheapest` routing and in
the ledger; adverts that stray from the enrolment are ignored; volunteers see no tenant."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest

from schemas import subjects
from schemas.jobs import ModelAdvert, NodeAdvert
from tests.enrol import (
    admin,
    connection_names,
    create_token,
    creds_file,
    join_node,
    node_view,
    raw_join,
    wait_for_node,
)
from tests.helpers import ECHO
from tests.stack import ADMIN_KEY, Stack

LAB = "lab"


def sdk(url: str, key: str = ADMIN_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met in time")


async def test_disable_cuts_the_node_off_and_its_jobs_move(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker()  # the operator's own worker, pool own: where the lab's jobs may go
    await stack.start_api(request_timeout=30.0)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http, sdk(stack.api_url) as client:
        token = await create_token(http, pool=LAB, models=[ECHO])
        proc = join_node(stack, stack.api_url, tmp_path / "lab-node", token=token["token"])
        node = await wait_for_node(http)
        await stack.wait_for_model(ECHO, nodes=2)

        streamed = await client.chat.completions.create(
            model=ECHO,
            messages=[{"role": "user", "content": "long [[tokens=400]] [[rate=20]]"}],
            stream=True,
            extra_body={"provider": {"only": [LAB]}},
        )
        first = await streamed.__anext__()  # it is running on the lab node, and has sent a token
        assert first.choices
        waiting = asyncio.create_task(
            client.chat.completions.create(
                model=ECHO,
                messages=[{"role": "user", "content": "moved [[tokens=2]] [[delay=2]]"}],
                extra_body={"provider": {"order": [LAB]}},
            )
        )

        async def both_running() -> bool:
            return (await node_view(http, node["id"]))["slots"]["used"] >= 2

        await eventually(both_running)
        name = f"tokenyard-worker-{node['id']}"
        assert name in await connection_names(stack)
        started = time.monotonic()
        r = await admin(http, "POST", f"/nodes/{node['id']}/disable")
        assert r.status_code == 200 and r.json()["state"] == "disabled", r.text

        async def gone() -> bool:
            return name not in await connection_names(stack)

        await eventually(gone, timeout=5)
        assert time.monotonic() - started < 2.0, "the node's connection outlived its disabling by 2 s"

        with pytest.raises(openai.APIError):  # after the first token: an explicit error, not a hang
            async for _ in streamed:
                pass
        moved = await asyncio.wait_for(waiting, 30)  # before its first token: served elsewhere
        assert moved.choices[0].message.content == "moved moved"
        assert proc.popen.wait(30) == 3  # the node saw NATS refuse it for good, and exited

        # no new jobs, and its credentials are refused
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "x"}], extra_body={"provider": {"only": [LAB]}}
            )
        assert refused.value.status_code == 503
        with pytest.raises(nats.errors.Error):
            await nats.connect(
                stack.nats_url,
                user_credentials=str(tmp_path / "lab-node" / "creds" / "node.creds"),
                allow_reconnect=False,
                connect_timeout=2,
            )

        # enable: the same stored identity serves again
        r = await admin(http, "POST", f"/nodes/{node['id']}/enable")
        assert r.status_code == 200 and r.json()["enabled"] is True
        join_node(stack, stack.api_url, tmp_path / "lab-node")
        await wait_for_node(http, node_id=node["id"])
        await stack.wait_for_model(ECHO, nodes=2)
        again = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "back"}], extra_body={"provider": {"only": [LAB]}}
        )
        assert again.choices[0].message.content.startswith("back")

        # remove: gone from the registry, cut off again
        r = await admin(http, "DELETE", f"/nodes/{node['id']}")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert (await admin(http, "GET", f"/nodes/{node['id']}")).status_code == 404
        await eventually(gone, timeout=5)

        actions = []
        for _ in range(100):
            audit = (await admin(http, "GET", "/audit")).json()["data"]
            changes = {"node.enrol", "node.disable", "node.enable", "node.remove"}  # not the fleet's own events
            actions = [e["action"] for e in audit if e["target"] == node["id"] and e["action"] in changes]
            if "node.remove" in actions:
                break
            await asyncio.sleep(0.1)
        assert actions == ["node.enrol", "node.disable", "node.enable", "node.remove"]

        usage = (await admin(http, "GET", "/usage/export", params={"format": "json"})).json()["data"]
        # the job moved before its first token names the node that answered it (the cut stream,
        # which a continuation may also have tried elsewhere, names the lab node that served it)
        moved_row = [u for u in usage if u["job_id"] == moved.id.removeprefix("chatcmpl-")]
        assert len(moved_row) == 1 and moved_row[0]["attempts"] > 1, moved_row
        assert moved_row[0]["node"] != node["id"] and moved_row[0]["outcome"] == "ok", moved_row


async def test_an_org_admin_sees_only_its_own_nodes(stack: Stack) -> None:
    await stack.start_api()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        keys = {}
        for name in ("acme", "globex"):
            org = (await admin(http, "POST", "/orgs", json={"name": name})).json()
            created = await admin(
                http, "POST", "/keys", json={"name": f"{name}-admin", "org": org["id"], "admin": True}
            )
            keys[name] = (org["id"], created.json()["key"])
        acme_org, acme_key = keys["acme"]
        _, globex_key = keys["globex"]
        token = await create_token(http, key=acme_key, pool=LAB, models=[ECHO])
        assert token["org"] == acme_org
        joined = await raw_join(http, token["token"], [ECHO])
        node_id = joined["node_id"]
        assert joined["org"] == acme_org

        mine = (await admin(http, "GET", "/nodes", key=acme_key)).json()["data"]
        assert [n["id"] for n in mine] == [node_id] and mine[0]["org"] == acme_org
        assert (await admin(http, "GET", "/nodes", key=globex_key)).json()["data"] == []
        for method, path in (
            ("GET", f"/nodes/{node_id}"),
            ("GET", f"/nodes/{node_id}/usage"),
            ("POST", f"/nodes/{node_id}/disable"),
            ("DELETE", f"/nodes/{node_id}"),
        ):
            r = await admin(http, method, path, key=globex_key)
            assert r.status_code == 404, (method, path, r.text)
        r = await admin(http, "PATCH", f"/nodes/{node_id}", key=globex_key, json={"price": {"input": 1}})
        assert r.status_code == 404
        # the other org's tokens are not listed either, and an org admin cannot make one for another org
        assert (await admin(http, "GET", "/nodes/tokens", key=globex_key)).json()["data"] == []
        r = await admin(http, "POST", "/nodes/tokens", key=globex_key, json={"pool": LAB, "org": acme_org})
        assert r.status_code == 404
        everyone = (await admin(http, "GET", "/nodes")).json()["data"]
        assert [n["id"] for n in everyone] == [node_id]  # the operator sees all
        assert (await node_view(http, node_id))["state"] == "offline"  # joined, never connected


async def test_the_owners_price_steers_cheapest_routing_and_is_the_ledgers_cost(stack: Stack, tmp_path: Path) -> None:
    await stack.start_api()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http, sdk(stack.api_url) as client:
        nodes = {}
        for pool in ("cheap", "dear"):
            token = await create_token(http, pool=pool, models=[ECHO])
            join_node(stack, stack.api_url, tmp_path / pool, token=token["token"])
            joined = await eventually(lambda: _online_in(http, pool), timeout=30)
            nodes[pool] = joined["id"]
        await stack.wait_for_model(ECHO, nodes=2)
        for pool, price in (("cheap", {"input": 1.0, "output": 2.0}), ("dear", {"input": 10.0, "output": 20.0})):
            r = await admin(http, "PATCH", f"/nodes/{nodes[pool]}", json={"price": price})
            assert r.status_code == 200 and r.json()["price"] == price, r.text
        r = await admin(http, "PUT", "/routing/default", json={"strategy": "cheapest"})
        assert r.status_code == 200, r.text

        async def row_of(job_id: str) -> dict[str, Any] | None:
            rows = (await admin(http, "GET", "/usage/export", params={"format": "json"})).json()["data"]
            return next((u for u in rows if u["job_id"] == job_id), None)

        async def served_by(expected: str) -> dict[str, Any]:
            """Ask until a request lands on `expected` (a policy change reaches every scheduler
            through a watch); returns its ledger row."""
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                answer = await client.chat.completions.create(
                    model=ECHO,
                    messages=[{"role": "user", "content": "price [[tokens=4]]"}],
                    extra_body={"usage": {"include": True}},
                )
                row = await eventually(lambda: row_of(answer.id.removeprefix("chatcmpl-")))
                if row["node"] == nodes[expected]:
                    assert answer.usage is not None and answer.usage.model_extra["cost"] == pytest.approx(row["cost"])
                    return dict(row)
                await asyncio.sleep(0.2)
            raise AssertionError(f"never served by {expected}")

        row = await served_by("cheap")
        assert row["cost"] == pytest.approx((row["prompt_tokens"] * 1.0 + row["completion_tokens"] * 2.0) / 1e6)
        assert row["cost"] > 0
        # the owners change their prices: the other node is now the cheaper one
        await admin(http, "PATCH", f"/nodes/{nodes['cheap']}", json={"price": {"input": 50.0, "output": 50.0}})
        row = await served_by("dear")
        assert row["cost"] == pytest.approx((row["prompt_tokens"] * 10.0 + row["completion_tokens"] * 20.0) / 1e6)


async def _online_in(http: httpx.AsyncClient, pool: str) -> dict[str, Any] | None:
    listed = (await admin(http, "GET", "/nodes")).json()["data"]
    return next((n for n in listed if n["pool"] == pool and n["state"] == "online"), None)


async def test_an_advert_that_strays_from_the_enrolment_attracts_no_jobs(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_BACKEND="echo", TOKENYARD_POOL="prov-a", TOKENYARD_KIND="own")
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http, sdk(stack.api_url) as client:
        token = await create_token(http, pool=LAB, kind="volunteer", models=[ECHO])
        joined = await raw_join(http, token["token"], [ECHO])
        rogue = await nats.connect(stack.nats_url, user_credentials=creds_file(stack, joined))
        node_id = joined["node_id"]
        lies = [
            NodeAdvert(node_id, "prov-a", (ModelAdvert(ECHO),), 64, 64, kind="volunteer"),  # another pool
            NodeAdvert(node_id, LAB, (ModelAdvert(ECHO),), 64, 64, kind="own"),  # another kind
            NodeAdvert(node_id, LAB, (ModelAdvert("not-enrolled"),), 64, 64, kind="volunteer"),  # another model
        ]
        try:
            for _ in range(15):
                for advert in lies:
                    await rogue.publish(subjects.fleet_heartbeat(node_id), advert.encode())
                await asyncio.sleep(0.1)
            models = [m.id for m in (await client.models.list()).data]
            assert "not-enrolled" not in models
            for only in (["prov-a"], [LAB]):
                for _ in range(3):  # prov-a: only the operator's worker serves; lab: nothing does
                    if only == [LAB]:
                        with pytest.raises(openai.APIStatusError) as e:
                            await client.chat.completions.create(
                                model=ECHO,
                                messages=[{"role": "user", "content": "x"}],
                                extra_body={"provider": {"only": only}},
                            )
                        assert e.value.status_code == 503
                    else:
                        r = await client.chat.completions.create(
                            model=ECHO,
                            messages=[{"role": "user", "content": "x"}],
                            extra_body={"provider": {"only": only}},
                        )
                        assert r.choices[0].message.content.startswith("x")
            usage = (await admin(http, "GET", "/usage/export", params={"format": "json"})).json()["data"]
            assert node_id not in {u["node"] for u in usage}
        finally:
            await rogue.close()


async def test_a_volunteer_sees_no_tenant_identity_key_or_address(stack: Stack) -> None:
    await stack.start_api(request_timeout=5.0)
    await stack.wait_for_scheduler()  # it makes the work queue
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        org = (await admin(http, "POST", "/orgs", json={"name": "tenant-co"})).json()
        key = (await admin(http, "POST", "/keys", json={"name": "t", "org": org["id"], "volunteer_ok": True})).json()
        token = await create_token(http, pool="idle", kind="volunteer", models=[ECHO])
        joined = await raw_join(http, token["token"], [ECHO])
        node_id = joined["node_id"]
        node = await nats.connect(
            stack.nats_url,
            user_credentials=creds_file(stack, joined),
            inbox_prefix=subjects.worker_inbox("idle", node_id),
        )
        try:
            psub = await node.jetstream().pull_subscribe(
                subjects.work_subject("idle", ECHO),
                durable=subjects.work_consumer("idle", ECHO),
                stream=subjects.WORK_STREAM,
            )
            advert = NodeAdvert(node_id, "idle", (ModelAdvert(ECHO),), 4, 4, kind="volunteer", interval=0.2)
            for _ in range(10):
                await node.publish(subjects.fleet_heartbeat(node_id), advert.encode())
                await asyncio.sleep(0.05)
            async with sdk(stack.api_url, key["key"]) as client:
                asked = asyncio.create_task(
                    client.chat.completions.create(
                        model=ECHO,
                        messages=[{"role": "user", "content": "private"}],
                        extra_body={"provider": {"only": ["idle"]}},
                        extra_headers={"x-forwarded-for": "203.0.113.9"},
                    )
                )
                msgs = []
                for _ in range(50):
                    await node.publish(subjects.fleet_heartbeat(node_id), advert.encode())
                    try:
                        msgs = await psub.fetch(1, timeout=0.2)
                        break
                    except TimeoutError:
                        continue
                assert msgs, "the volunteer never got the job"
                raw = msgs[0].data + repr(msgs[0].headers or {}).encode()
                for secret in (org["id"], key["id"], key["key"], "127.0.0.1", "203.0.113.9", "tenant-co"):
                    assert secret.encode() not in raw, f"{secret!r} reached a volunteer node"
                assert b"private" in raw  # the prompt itself it must see
                await msgs[0].term()
                asked.cancel()
        finally:
            await node.close()
