"""The control plane: orgs and keys, revocation across gateways, tenancy, the ledger (exact for
plain, streamed, cancelled, failed-over and cached requests), the audit log and the cache."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats.js.errors
import openai
import pytest
import pytest_asyncio

from schemas import subjects
from tests.helpers import ECHO, Sse, admin, new_key, sdk, wait_rows, watch_adverts
from tests.scrape import samples, value
from tests.stack import Stack, auth_headers

USER = [{"role": "user", "content": "hello ledger"}]


@pytest.fixture
async def http(echo_stack: Stack) -> httpx.AsyncClient:
    async with httpx.AsyncClient(base_url=echo_stack.api_url, timeout=30) as c:
        yield c


async def test_keys_are_shown_once_stored_hashed_and_work(echo_stack: Stack, http: httpx.AsyncClient) -> None:
    created = await new_key(http, models=[ECHO])
    secret = created["key"]
    assert secret.startswith(f"ty_{created['id']}_") and "digest" not in created
    kv = await (await echo_stack.bus()).jetstream().key_value(subjects.KEYS_BUCKET)
    stored = (await kv.get(created["id"])).value
    assert secret.encode() not in stored and secret.split("_", 2)[2].encode() not in stored
    listed = (await admin(http, "GET", "/keys")).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0] and "digest" not in listed[0]
    async with openai.AsyncOpenAI(base_url=f"{echo_stack.api_url}/v1", api_key=secret, max_retries=0) as c:
        r = await c.chat.completions.create(model=ECHO, messages=USER, max_tokens=2)
        assert r.choices[0].message.content == "hello ledger"


async def test_ledger_is_exact_for_every_kind_of_request(stack: Stack) -> None:
    workers = [stack.start_worker(TOKENYARD_NODE_ID=f"w{i}", TOKENYARD_SLOTS="4") for i in range(2)]
    await stack.start_api()
    await stack.wait_for_model(ECHO, nodes=2)
    adverts = await watch_adverts(stack)
    seen: dict[str, tuple[int, int]] = {}  # what each client received: (prompt, completion) tokens
    async with sdk(stack) as client, httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        plain = await client.chat.completions.create(model=ECHO, messages=USER, max_tokens=7)
        seen[plain.id] = (plain.usage.prompt_tokens, plain.usage.completion_tokens)
        stream = await client.chat.completions.create(
            model=ECHO, messages=USER, max_tokens=9, stream=True, stream_options={"include_usage": True}
        )
        whole = await Sse().drain(stream)
        if whole.usage:
            seen[whole.id] = (whole.usage["prompt_tokens"], whole.usage["completion_tokens"])
        # cancelled mid-stream after some tokens
        stream = await client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "tick [[tokens=500]] [[rate=100]]"}], stream=True
        )
        cut = await Sse().drain(stream, until=lambda s: s.texts >= 3)
        cancelled_id, got = cut.id, cut.texts
        await stream.close()
        # failed over: the first worker dies before its first token
        request = asyncio.create_task(
            client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "fail over [[tokens=4]] [[delay=1.0]]"}]
            )
        )
        assert await adverts.wait(lambda a: any(n.slots_free < 4 for n in a.values()), 3.0)
        busy = next(n for n, a in adverts.latest.items() if a.slots_free < 4)
        workers[int(busy[1:])].signal(signal.SIGKILL)
        failed_over = await asyncio.wait_for(request, 15)
        seen[failed_over.id] = (failed_over.usage.prompt_tokens, failed_over.usage.completion_tokens)
        # cached: the same deterministic request twice
        for _ in range(2):
            r = await client.chat.completions.with_raw_response.create(
                model=ECHO, messages=USER, max_tokens=3, temperature=0
            )
            answer = r.parse()
            seen[answer.id] = (answer.usage.prompt_tokens, answer.usage.completion_tokens)
        assert r.headers["x-tokenyard-cache"] == "hit"
        rows = await wait_rows(http, 6)
    by_id = {f"chatcmpl-{row['job_id']}": row for row in rows}
    assert len(rows) == len(by_id) == 6  # one row per job, each once
    for cid, (prompt, completion) in seen.items():
        assert (by_id[cid]["prompt_tokens"], by_id[cid]["completion_tokens"]) == (prompt, completion), cid
        assert by_id[cid]["outcome"] in {"ok", "cached"}
    cancelled = by_id[cancelled_id]
    assert cancelled["outcome"] == "cancelled" and got <= cancelled["completion_tokens"] <= got + 10
    assert by_id[failed_over.id]["attempts"] >= 1 and by_id[failed_over.id]["outcome"] == "ok"
    assert [row["outcome"] for row in rows].count("cached") == 1


async def test_usage_reports_and_csv_export(echo_stack: Stack, http: httpx.AsyncClient) -> None:
    secrets_ = [(await new_key(http, name=f"k{i}"))["key"] for i in range(2)]
    for i, secret in enumerate(secrets_):
        for _ in range(i + 1):
            r = await http.post(
                "/v1/chat/completions",
                json={"model": ECHO, "messages": USER, "max_tokens": 2},
                headers=auth_headers(secret),
            )
            assert r.status_code == 200
    await wait_rows(http, 3)
    by_key = (await admin(http, "GET", "/usage", params={"group_by": "key"})).json()["data"]
    assert sorted(row["requests"] for row in by_key) == [1, 2]
    assert all(row["completion_tokens"] == 2 * row["requests"] for row in by_key)
    by_model = (await admin(http, "GET", "/usage", params={"group_by": "model"})).json()["data"]
    assert by_model == [{**by_model[0], "model": ECHO, "requests": 3, "completion_tokens": 6}]
    by_day = (await admin(http, "GET", "/usage", params={"group_by": "day"})).json()["data"]
    assert by_day[0]["day"] == time.strftime("%Y-%m-%d", time.gmtime()) and by_day[0]["requests"] == 3
    text = (await admin(http, "GET", "/usage/export", params={"format": "csv"})).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 and {r["model"] for r in rows} == {ECHO} and rows[0]["job_id"]
    bad = await admin(http, "GET", "/usage", params={"group_by": "colour"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


async def test_idempotency_key_runs_once(echo_stack: Stack, http: httpx.AsyncClient) -> None:
    other = await echo_stack.start_api()  # a second gateway shares the claims
    body = {"model": ECHO, "messages": [{"role": "user", "content": "exactly once [[tokens=6]] [[rate=20]]"}]}
    headers = {**auth_headers(), "Idempotency-Key": "order-42"}
    async with httpx.AsyncClient(base_url=other, timeout=30) as http2:
        first, second = await asyncio.gather(
            http.post("/v1/chat/completions", json=body, headers=headers),
            http2.post("/v1/chat/completions", json=body, headers=headers),
        )
        third = await http2.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
    assert first.status_code == second.status_code == third.status_code == 200
    assert first.json()["choices"] == second.json()["choices"]
    assert "exactly once exactly" in third.text and third.text.rstrip().endswith("[DONE]")
    assert [r.headers.get("idempotent-replayed") for r in (first, second)].count("true") == 1
    rows = await wait_rows(http, 1)
    await asyncio.sleep(0.5)
    rows = (await admin(http, "GET", "/usage/export", params={"format": "json"})).json()["data"]
    assert len(rows) == 1  # one job ran and was billed
    # another key value runs again; a failed first run does not block a retry
    r = await http.post("/v1/chat/completions", json=body, headers={**auth_headers(), "Idempotency-Key": "order-43"})
    assert r.status_code == 200 and r.headers.get("idempotent-replayed") is None
    bad = {"model": ECHO, "messages": USER, "response_format": {"type": "json_object"}}
    h44 = {**auth_headers(), "Idempotency-Key": "order-44"}
    assert (await http.post("/v1/chat/completions", json=bad, headers=h44)).status_code == 400
    assert (await http.post("/v1/chat/completions", json=body, headers=h44)).status_code == 200


async def test_metrics_show_requests_and_queues(echo_stack: Stack, http: httpx.AsyncClient) -> None:
    for _ in range(2):
        r = await http.post(
            "/v1/chat/completions", json={"model": ECHO, "messages": USER, "max_tokens": 2}, headers=auth_headers()
        )
        assert r.status_code == 200
    text = (await http.get("/metrics")).text
    assert value(text, "tokenyard_api_requests_total", model=ECHO, outcome="ok", status="200", route="own") == 2
    assert value(text, "tokenyard_api_tokens_total", model=ECHO, kind="completion") == 4
    assert value(text, "tokenyard_api_request_duration_seconds_count", model=ECHO) == 2
    assert ("tokenyard_api_work_queue_jobs", frozenset({("pool", "own"), ("model", ECHO), ("state", "waiting")})) in (
        samples(text)
    )


async def test_node_lifecycle_is_audited_once(stack: Stack) -> None:
    # adverts every second, not every 0.2 s: on a loaded machine three missed 0.2 s adverts (a
    # starved process) are a "leave", and this test is about one clean drain
    worker = stack.start_worker(TOKENYARD_NODE_ID="gpu-7", TOKENYARD_HEARTBEAT="1.0")
    await stack.start_api()
    # a second gateway with its own ledger sees the same node: each event is still recorded once
    await stack.start_api(ledger_name="replica-2", data_dir=str(stack.tmp / "data-2"))
    await stack.wait_for_model(ECHO)
    # stopped only once it has started (its pull requests stand): a SIGTERM during its start is
    # handled when the start ends, and its adverts may pause meanwhile (seen as a leave)
    js = (await stack.bus()).jetstream()
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            if (await js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer("own", ECHO))).num_waiting:
                break
        assert time.monotonic() < deadline, "the worker never stood ready to pull"
        await asyncio.sleep(0.05)
    worker.stop()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        deadline = time.monotonic() + 10
        actions: list[str] = []
        while time.monotonic() < deadline:
            events = (await admin(http, "GET", "/audit")).json()["data"]
            actions = [e["action"] for e in events if e["target"] == "gpu-7"]
            if {"node.drain", "node.leave"} <= set(actions):  # published apart: either may land first
                break
            await asyncio.sleep(0.1)
    assert actions == ["node.join", "node.drain", "node.leave"]


# --- on one stack for the module: these only add keys and orgs of their own and read them back,
# and count nothing another test adds to (they run in the module's event loop: conftest.py) ----

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_http(shared_echo_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shared_echo_stack.api_url, timeout=30) as c:
        yield c


@MODULE_LOOP
async def test_tenants_see_only_their_own(shared_http: httpx.AsyncClient) -> None:
    http = shared_http
    orgs = []
    for name in ("acme", "globex"):
        r = await admin(http, "POST", "/orgs", json={"name": name, "projects": ["web"]})
        assert r.status_code == 201, r.text
        orgs.append(r.json()["id"])
    acme_admin = (await new_key(http, org=orgs[0], admin=True))["key"]
    globex_key = await new_key(http, org=orgs[1], project="web")
    # acme's admin: globex's key and org do not exist for it
    assert (await admin(http, "GET", f"/keys/{globex_key['id']}", key=acme_admin)).status_code == 404
    assert (await admin(http, "GET", f"/orgs/{orgs[1]}", key=acme_admin)).status_code == 404
    assert (await admin(http, "POST", f"/keys/{globex_key['id']}/revoke", key=acme_admin)).status_code == 404
    r = await admin(http, "POST", "/keys", key=acme_admin, json={"name": "x", "org": orgs[1]})
    assert r.status_code == 404
    listed = (await admin(http, "GET", "/keys", key=acme_admin)).json()["data"]
    assert {k["org"] for k in listed} == {orgs[0]}
    assert (await admin(http, "GET", "/orgs", key=acme_admin)).json()["data"][0]["id"] == orgs[0]
    # org admins cannot create orgs or raise their own limits
    assert (await admin(http, "POST", "/orgs", key=acme_admin, json={"name": "x"})).status_code == 403
    assert (await admin(http, "PATCH", f"/orgs/{orgs[0]}", key=acme_admin, json={"name": "y"})).status_code == 403
    # a plain key may not use the admin API at all
    assert (await admin(http, "GET", "/keys", key=globex_key["key"])).status_code == 403
    # unknown and privileged fields are refused
    for bad in ({"name": "x", "digest": "00"}, {"name": "x", "revoked": 0}, {"name": "x", "root": True}):
        r = await admin(http, "POST", "/keys", key=acme_admin, json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter", r.text


@MODULE_LOOP
async def test_model_scopes_and_max_tokens_limit(shared_http: httpx.AsyncClient) -> None:
    http = shared_http
    scoped = (await new_key(http, models=["some/other-model"]))["key"]
    r = await http.post("/v1/chat/completions", json={"model": ECHO, "messages": USER}, headers=auth_headers(scoped))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    capped = (await new_key(http, limits={"max_tokens": 5}))["key"]
    r = await http.post(
        "/v1/chat/completions", json={"model": ECHO, "messages": USER, "max_tokens": 6}, headers=auth_headers(capped)
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@MODULE_LOOP
async def test_audit_log_records_who_did_what(shared_http: httpx.AsyncClient) -> None:
    http = shared_http
    created = await new_key(http, name="audited")
    await admin(http, "POST", f"/keys/{created['id']}/revoke")
    deadline = time.monotonic() + 10
    actions: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        actions = (await admin(http, "GET", "/audit")).json()["data"]
        if {"key.create", "key.revoke"} <= {a["action"] for a in actions}:
            break
        await asyncio.sleep(0.1)
    by_action = {a["action"]: a for a in actions}
    assert by_action["key.create"]["target"] == created["id"] and by_action["key.create"]["actor"] == "admin"
    assert by_action["key.revoke"]["source"] == "127.0.0.1"
    assert "admin.signin" in by_action
    assert all(created["key"] not in str(a) for a in actions)


@MODULE_LOOP
async def test_cache_rules(shared_http: httpx.AsyncClient) -> None:
    http = shared_http
    h = auth_headers()
    body = {"model": ECHO, "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 3}
    first = await http.post("/v1/chat/completions", json={**body, "temperature": 0}, headers=h)
    second = await http.post("/v1/chat/completions", json={**body, "temperature": 0}, headers=h)
    assert (first.headers["x-tokenyard-cache"], second.headers["x-tokenyard-cache"]) == ("miss", "hit")
    assert first.json()["choices"] == second.json()["choices"] and first.json()["id"] != second.json()["id"]
    # streamed hit
    async with http.stream(
        "POST", "/v1/chat/completions", json={**body, "temperature": 0, "stream": True}, headers=h
    ) as r:
        assert r.headers["x-tokenyard-cache"] == "hit"
        raw = (await r.aread()).decode()
    assert '"content":"cache me cache"' in raw and raw.rstrip().endswith("data: [DONE]")
    # non-deterministic requests, a bypass header, and opted-out keys are not cached
    r = await http.post("/v1/chat/completions", json={**body, "temperature": 0.7}, headers=h)
    assert r.headers["x-tokenyard-cache"] == "bypass"
    r = await http.post(
        "/v1/chat/completions", json={**body, "temperature": 0}, headers={**h, "x-tokenyard-cache": "no"}
    )
    assert r.headers["x-tokenyard-cache"] == "bypass"
    opted_out = (await new_key(http, cache=False))["key"]
    r = await http.post("/v1/chat/completions", json={**body, "temperature": 0}, headers=auth_headers(opted_out))
    assert r.headers["x-tokenyard-cache"] == "bypass"
    # a different request is a miss
    r = await http.post("/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 2}, headers=h)
    assert r.headers["x-tokenyard-cache"] == "miss"


@MODULE_LOOP
async def test_cost_in_usage_when_asked(shared_client: openai.AsyncOpenAI) -> None:
    client = shared_client
    r = await client.chat.completions.create(
        model=ECHO, messages=USER, max_tokens=2, extra_body={"usage": {"include": True}}
    )
    assert r.usage.model_extra.get("cost") == 0.0  # own capacity has no price
    r = await client.chat.completions.create(model=ECHO, messages=USER, max_tokens=2)
    assert "cost" not in (r.usage.model_extra or {})


@MODULE_LOOP
async def test_a_keys_rate_limit_is_a_429_through_the_gateway(shared_http: httpx.AsyncClient) -> None:
    http = shared_http
    limited = (await new_key(http, limits={"rpm": 2}))["key"]
    body = {"model": ECHO, "messages": USER, "max_tokens": 1}
    statuses = [(await http.post("/v1/chat/completions", json=body, headers=auth_headers(limited))) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    err = statuses[2].json()["error"]
    assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
    assert int(statuses[2].headers["retry-after"]) >= 1
    # another key is not affected
    assert (await http.post("/v1/chat/completions", json=body, headers=auth_headers())).status_code == 200


@MODULE_LOOP
async def test_revocation_reaches_every_gateway_within_two_seconds(
    shared_echo_stack: Stack, shared_http: httpx.AsyncClient
) -> None:
    http, echo_stack = shared_http, shared_echo_stack
    other = await echo_stack.start_api()
    secret = (await new_key(http))["key"]
    body = {"model": ECHO, "messages": USER, "max_tokens": 1}
    async with httpx.AsyncClient(base_url=other) as http2:
        assert (await http2.post("/v1/chat/completions", json=body, headers=auth_headers(secret))).status_code == 200
        key_id = secret.split("_")[1]
        assert (await admin(http, "POST", f"/keys/{key_id}/revoke")).status_code == 200
        revoked_at = time.monotonic()
        status = 200
        while time.monotonic() - revoked_at < 2.0:
            status = (await http2.post("/v1/chat/completions", json=body, headers=auth_headers(secret))).status_code
            if status == 401:
                break
            await asyncio.sleep(0.01)
        assert status == 401
