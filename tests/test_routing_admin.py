"""Routing policies through the admin API and CLI: stored in NATS KV, applied by every
scheduler without a restart, scoped per org, validated, and audited."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from typing import Any

import httpx
import pytest

from broker_api import admin_cli
from scheduler.routing import RoutingTable
from schemas.routing import Policy, key_entry, model_entry, parse_entry
from tests.helpers import ECHO, admin, new_key, sdk, wait_rows
from tests.stack import ADMIN_KEY, Stack

ASK = [{"role": "user", "content": "route me"}]


# --- pure ------------------------------------------------------------------------------------


def test_policies_round_trip_and_refuse_what_cannot_route() -> None:
    p = Policy.from_dict({"strategy": "weighted", "weights": {"a": 0.9, "b": 0.1}})
    assert Policy.decode(p.encode()) == p
    assert Policy.from_dict(Policy(strategy="failover", order=("x", "y")).to_dict()).order == ("x", "y")
    for bad, words in (
        ({"strategy": "random"}, "unknown routing strategy"),
        ({"strategy": "weighted"}, "needs `weights`"),
        ({"strategy": "failover"}, "needs an `order`"),
        ({"strategy": "cheapest", "base_url": "http://x"}, "unknown field"),
        ({"strategy": "own_first", "spill_wait": -1}, "spill_wait"),
        ({"strategy": "weighted", "weights": {"a": "lots"}}, "weights"),
        ({"strategy": "failover", "order": "a,b"}, "order"),
    ):
        with pytest.raises(ValueError, match=words):
            Policy.from_dict(bad)


def test_entries_name_any_model_or_key_and_overlay_the_file() -> None:
    for model in ("meta-llama/Llama-3.1-8B", "a.b:c d", "x_y"):
        assert parse_entry(model_entry(model)) == ("model", model)
    assert parse_entry(key_entry("k_1")) == ("key", "k_1")
    assert parse_entry("default") == ("default", "")
    with pytest.raises(ValueError):
        parse_entry("q.zzz")
    base = RoutingTable.from_dict(
        {"default": {"strategy": "cheapest"}, "models": {"m1": {"strategy": "fastest"}, "m2": {"strategy": "cheapest"}}}
    )
    top = base.overlaid(
        {("model", "m1"): Policy(strategy="failover", order=("a",)), ("key", "k"): Policy(strategy="own_first")}
    )
    assert top.policy_for("m1", "other").strategy == "failover"  # the admin API's entry replaces the file's
    assert top.policy_for("m2", "other").strategy == "cheapest"  # the file's stays where nothing replaced it
    assert top.policy_for("m2", "k").strategy == "own_first"  # a key's policy wins over the model's
    assert top.policy_for("m3", "other").strategy == "cheapest"  # the file's default


# --- through the stack: two schedulers, two pools ----------------------------------------------


async def routes_of(client: Any, http: httpx.AsyncClient, n: int, seen_before: int) -> list[str]:
    """Send n requests one by one; the pools that served them, from the ledger."""
    ids = []
    for _ in range(n):
        r = await client.chat.completions.create(model=ECHO, messages=ASK, max_tokens=3)
        ids.append(r.id.removeprefix("chatcmpl-"))
    rows = {row["job_id"]: row for row in await wait_rows(http, seen_before + n)}
    return [rows[i]["route"] for i in ids]


async def settle_on(client: Any, http: httpx.AsyncClient, pool: str, seen: list[int]) -> None:
    """Wait (bounded) until a request lands on `pool`: the schedulers' watches caught up."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        route = (await routes_of(client, http, 1, seen[0]))[0]
        seen[0] += 1
        if route == pool:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the policy never sent a request to pool {pool!r}")


async def test_policies_set_through_the_admin_api_steer_every_scheduler(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker(TOKENYARD_POOL="a", TOKENYARD_NODE_ID="wa")
    stack.start_worker(TOKENYARD_POOL="b", TOKENYARD_NODE_ID="wb")
    await stack.start_api()
    await stack.wait_for_model(ECHO, nodes=2)
    seen = [0]
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http, sdk(stack) as root_client:
        # the operator puts the model on pool b first, a as its fallback
        r = await admin(http, "PUT", f"/routing/models/{ECHO}", json={"strategy": "failover", "order": ["b", "a"]})
        assert r.status_code == 200, r.text
        assert r.json()["policy"] == {"strategy": "failover", "order": ["b", "a"]}
        await settle_on(root_client, http, "b", seen)
        assert await routes_of(root_client, http, 8, seen[0]) == ["b"] * 8
        seen[0] += 8
        # one key goes to pool a instead; everyone else stays on b
        special = await new_key(http, name="to-a")
        r = await admin(
            http, "PUT", f"/routing/keys/{special['id']}", json={"strategy": "failover", "order": ["a", "b"]}
        )
        assert r.status_code == 200, r.text
        async with sdk(stack) as c:
            c.api_key = special["key"]
            await settle_on(c, http, "a", seen)
            assert await routes_of(c, http, 4, seen[0]) == ["a"] * 4
            seen[0] += 4
            assert await routes_of(root_client, http, 4, seen[0]) == ["b"] * 4
            seen[0] += 4
            shown = (await admin(http, "GET", "/routing")).json()
            assert shown["models"] == {ECHO: {"strategy": "failover", "order": ["b", "a"]}}
            assert shown["keys"] == {special["id"]: {"strategy": "failover", "order": ["a", "b"]}}
            # the key's policy removed: it follows the model's again
            assert (await admin(http, "DELETE", f"/routing/keys/{special['id']}")).status_code == 200
            await settle_on(c, http, "b", seen)
        # every change is in the audit log: who, what, on what
        deadline = time.monotonic() + 10
        audit: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            audit = [
                a for a in (await admin(http, "GET", "/audit")).json()["data"] if a["action"].startswith("routing")
            ]
            if len(audit) >= 3:
                break
            await asyncio.sleep(0.1)
        assert sorted((a["action"], a["target"]) for a in audit) == sorted(
            [
                ("routing.set", f"model:{ECHO}"),
                ("routing.set", f"key:{special['id']}"),
                ("routing.delete", f"key:{special['id']}"),
            ]
        )
        assert all(a["actor"] == "admin" and a["source"] == "127.0.0.1" for a in audit)


async def test_routing_is_scoped_per_org_and_validated(echo_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=echo_stack.api_url, timeout=30) as http:
        org = (await admin(http, "POST", "/orgs", json={"name": "acme"})).json()["id"]
        acme_admin = (await new_key(http, org=org, admin=True))["key"]
        acme_key = await new_key(http, org=org)
        other_key = await new_key(http)  # the operator's org
        policy = {"strategy": "cheapest"}
        # an org admin steers its own keys only; default and model policies are the operator's
        assert (await admin(http, "PUT", "/routing/default", key=acme_admin, json=policy)).status_code == 403
        assert (await admin(http, "PUT", f"/routing/models/{ECHO}", key=acme_admin, json=policy)).status_code == 403
        r = await admin(http, "PUT", f"/routing/keys/{other_key['id']}", key=acme_admin, json=policy)
        assert r.status_code == 404  # another org's key does not exist for it
        r = await admin(http, "PUT", f"/routing/keys/{acme_key['id']}", key=acme_admin, json=policy)
        assert r.status_code == 200, r.text
        assert (await admin(http, "PUT", f"/routing/keys/{other_key['id']}", json=policy)).status_code == 200
        mine = (await admin(http, "GET", "/routing", key=acme_admin)).json()
        assert set(mine["keys"]) == {acme_key["id"]}
        everything = (await admin(http, "GET", "/routing")).json()
        assert set(everything["keys"]) == {acme_key["id"], other_key["id"]}
        # a plain key may not touch routing at all
        assert (await admin(http, "GET", "/routing", key=acme_key["key"])).status_code == 403
        # bad policies are OpenAI-style 400s, never 422 or 500
        for bad in (
            {"strategy": "random"},
            {"strategy": "weighted"},
            {"strategy": "failover", "order": ["a"], "headers": {"x": "y"}},
            [],
            "cheapest",
        ):
            r = await admin(http, "PUT", "/routing/default", json=bad)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await http.put(
            "/v1/admin/routing/default",
            content=b"{not json",
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        )
        assert r.status_code == 400


async def test_the_cli_sets_shows_and_deletes_policies(echo_stack: Stack) -> None:
    def cli(*args: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert admin_cli.main(["routing", *args, "--api-url", echo_stack.api_url, "--admin-key", ADMIN_KEY]) == 0
        return out.getvalue()

    # the CLI is synchronous and the gateway runs in this event loop: call it from a thread
    await asyncio.to_thread(
        cli, "set", f"model:{ECHO}", "--strategy", "weighted", "--weight", "own=1", "--weight", "spare=0.5"
    )
    shown = await asyncio.to_thread(cli, "show")
    assert '"own": 1.0' in shown and '"spare": 0.5' in shown and ECHO in shown
    await asyncio.to_thread(cli, "delete", f"model:{ECHO}")
    assert ECHO not in await asyncio.to_thread(cli, "show")
    with pytest.raises(SystemExit, match="POOL=NUMBER"):
        await asyncio.to_thread(cli, "set", "default", "--strategy", "weighted", "--weight", "own")
