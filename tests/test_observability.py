"""Operators' view of a real stack: every role's `/metrics` (refusals counted), the Grafana
dashboard's queries against real scrapes, and one request's id in every role's log."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ECHO
from tests.scrape import names, value
from tests.stack import Stack, auth_headers, free_port

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "tokenyard.json"
USER = [{"role": "user", "content": "hello metrics"}]


def dashboard_metrics() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs and all(p.get("targets") for p in board["panels"] if p["type"] != "row")
    return {name for e in exprs for name in re.findall(r"\btokenyard_[a-z0-9_]+", e)}


async def chat(http: httpx.AsyncClient, key: str = "", **body: object) -> httpx.Response:
    headers = auth_headers(key) if key else auth_headers()
    return await http.post(
        "/v1/chat/completions", json={"model": ECHO, "messages": USER, "max_tokens": 2, **body}, headers=headers
    )


@pytest.fixture
async def bare(tmp_path: Path) -> AsyncIterator[Stack]:
    """nats-server only: each test starts its roles with the settings it needs."""
    s = Stack(tmp_path)
    s.start_nats()
    try:
        yield s
    finally:
        await s.close()


async def test_every_role_serves_metrics_and_refusals_are_counted(bare: Stack) -> None:
    stack = bare
    sched_port, worker_port, gone_port = free_port(), free_port(), free_port()
    stack.start_scheduler(TOKENYARD_METRICS_PORT=str(sched_port))
    stack.start_worker(TOKENYARD_METRICS_PORT=str(worker_port))
    gone = stack.start_worker(TOKENYARD_MODELS="gone-model", TOKENYARD_METRICS_PORT=str(gone_port))
    await stack.start_api(lanes=False)  # every job through the scheduler, so it counts them all
    await stack.wait_for_model(ECHO, nodes=1)
    await stack.wait_for_model("gone-model", nodes=1)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        for _ in range(2):
            assert (await chat(http)).status_code == 200
        assert (await chat(http, stream=True)).status_code == 200
        assert (await chat(http, model="no-such-model")).status_code == 404
        assert (await chat(http, temperature=9)).status_code == 400
        r = await http.post("/v1/admin/keys", json={"name": "slow", "limits": {"rpm": 1}}, headers=auth_headers())
        limited = r.json()["key"]
        codes = [(await chat(http, limited)).status_code for _ in range(4)]
        assert codes[0] == 200 and codes.count(429) == 3, codes
        gone.stop()
        deadline = time.monotonic() + 15
        while (status := (await chat(http, model="gone-model")).status_code) != 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert status == 503

        api = (await http.get("/metrics")).text
        assert value(api, "tokenyard_api_requests_total", status="200", outcome="ok", model=ECHO) == 4
        assert value(api, "tokenyard_api_requests_total", status="404", outcome="invalid", model="") == 1
        assert value(api, "tokenyard_api_requests_total", status="400", outcome="invalid") == 1
        assert value(api, "tokenyard_api_requests_total", status="429", outcome="refused", model=ECHO) == 3
        assert value(api, "tokenyard_api_requests_total", status="503", outcome="refused", model="gone-model") >= 1
        assert value(api, "tokenyard_api_tokens_total", model=ECHO, route="own", kind="completion") == 8
        assert value(api, "tokenyard_api_time_to_first_token_seconds_count", model=ECHO) == 4
        assert value(api, "tokenyard_api_http_requests_total", handler="/v1/chat/completions", status="429") == 3
        assert "no-such-model" not in api  # a client's text never becomes a label

        scheduler = httpx.get(f"http://127.0.0.1:{sched_port}/metrics", timeout=5).text
        assert value(scheduler, "tokenyard_scheduler_quota_refusals_total", limit="rpm") == 3
        assert value(scheduler, "tokenyard_scheduler_admissions_total", model=ECHO, result="queued") == 4
        assert value(scheduler, "tokenyard_scheduler_admissions_total", result="model_not_found") == 1
        assert value(scheduler, "tokenyard_scheduler_nodes", kind="own", state="ready") == 1
        assert value(scheduler, "tokenyard_scheduler_slots", pool="own", state="free") == 64
        assert value(scheduler, "tokenyard_scheduler_queue_wait_seconds_count", model=ECHO) == 4
        worker = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5).text
        assert value(worker, "tokenyard_worker_jobs_total", model=ECHO, outcome="done") == 4
        assert value(worker, "tokenyard_worker_tokens_total", model=ECHO) == 8
        assert value(worker, "tokenyard_worker_slots", state="free") == 64
        for port in (sched_port, worker_port):
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            assert httpx.get(f"http://127.0.0.1:{port}/nope", timeout=5).status_code == 404

    # Every metric the dashboard queries has series in the roles' scrapes (not only declared).
    missing = dashboard_metrics() - (names(api) | names(scheduler) | names(worker))
    assert not missing, f"the dashboard queries metrics no role exposes: {sorted(missing)}"


async def test_one_request_id_is_in_every_roles_log(bare: Stack) -> None:
    stack = bare
    info = {"TOKENYARD_LOG_LEVEL": "info", "TOKENYARD_LOG_JSON": "true"}
    scheduler = stack.start_scheduler(**info)
    worker = stack.start_worker(**info)
    api, url = await stack.spawn_api(**info)
    stack.api_url = url
    await stack.wait_for_model(ECHO)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        headers = {**auth_headers(), "x-request-id": "my-trace-123"}
        body = {"model": ECHO, "messages": USER, "max_tokens": 2, "provider": {"sort": "latency"}}
        r = await http.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200 and r.headers["x-request-id"] == "my-trace-123"
    job_id = r.json()["id"].removeprefix("chatcmpl-")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all("my-trace-123" in p.output() for p in (api, scheduler, worker)):
        await asyncio.sleep(0.1)
    for proc, event in ((api, "request.done"), (scheduler, "job.enqueued"), (worker, "job.done")):
        lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == "my-trace-123"]
        assert any(line["event"] == event for line in mine), (proc.name, proc.output()[-3000:])
        assert all(
            line.get("job_id") == job_id and line.get("model") == ECHO for line in mine if line["event"] == event
        )
        assert all(line.get("role") == proc.name for line in lines), proc.name
        assert all(text.startswith("{") for text in proc.output().splitlines() if text.strip()), proc.output()
    api_lines = [json.loads(line) for line in api.output().splitlines() if line.startswith("{")]
    done = next(
        line for line in api_lines if line["event"] == "request.done" and line.get("request_id") == "my-trace-123"
    )
    assert done["status"] == 200 and done["outcome"] == "ok" and done["completion_tokens"] == 2
    assert "hello metrics" not in api.output() + scheduler.output() + worker.output()  # never the prompt
    assert not any(line["event"] == "api.unknown_fields" for line in api_lines)  # `provider` is documented
