"""Operators' papercuts, each tried as a new user would: the admin CLI finds a local `up` and
takes its flags anywhere, PATCH merges, keys update and rotate, tables people can read, a
reused Idempotency-Key with another body refused, provider keys per adapter, config errors
as one line, `up --providers` and `tokenyard top`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from broker_api.tables import cell, human_time
from tests.fake_provider import FakeProvider
from tests.helpers import ECHO
from tests.stack import ADMIN_KEY, Stack, auth_headers, free_port
from worker.providers import ProviderConfigError, load_providers

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from broker_api.cli import main; main(sys.argv[1:])"]
USER = [{"role": "user", "content": "papercut"}]


def tokenyard(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("TOKENYARD_API_URL", "TOKENYARD_ADMIN_KEY")}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})})


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(tokenyard, *args, env=env)


async def admin(http: httpx.AsyncClient, method: str, path: str, **kw: Any) -> httpx.Response:
    return await http.request(method, "/v1/admin" + path, headers=auth_headers(), **kw)


async def test_the_cli_finds_a_local_up_and_takes_global_flags_anywhere(echo_stack: Stack, tmp_path: Path) -> None:
    data = tmp_path / "up-data"
    data.mkdir()
    (data / "api_url").write_text(echo_stack.api_url + "\n")  # as `tokenyard up` writes it
    (data / "admin_key").write_text(ADMIN_KEY + "\n")
    found = await cli("keys", "list", "--data-dir", str(data))
    assert found.returncode == 0, found.stderr
    before = await cli("--api-url", echo_stack.api_url, "--admin-key", ADMIN_KEY, "orgs", "list")
    after = await cli("orgs", "list", "--api-url", echo_stack.api_url, "--admin-key", ADMIN_KEY)
    middle = await cli("keys", "--api-url", echo_stack.api_url, "--admin-key", ADMIN_KEY, "list")
    assert before.returncode == after.returncode == middle.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout
    nowhere = await cli("keys", "list", "--data-dir", str(tmp_path / "empty"), "--admin-key", ADMIN_KEY)
    assert nowhere.returncode != 0 and "127.0.0.1:8000" in nowhere.stderr and "Traceback" not in nowhere.stderr


async def test_patch_merges_and_keys_update_and_rotate(echo_stack: Stack) -> None:
    env = {"TOKENYARD_API_URL": echo_stack.api_url, "TOKENYARD_ADMIN_KEY": ADMIN_KEY}
    async with httpx.AsyncClient(base_url=echo_stack.api_url, timeout=30) as http:
        r = await admin(
            http, "POST", "/orgs", json={"name": "acme", "limits": {"tokens_per_day": 500, "usd_per_day": 2}}
        )
        org = r.json()["id"]
        r = await admin(http, "PATCH", f"/orgs/{org}", json={"limits": {"rpm": 1000}})
        assert r.status_code == 200 and r.json()["limits"] == {"rpm": 1000, "tokens_per_day": 500, "usd_per_day": 2.0}
        updated = await cli("orgs", "update", org, "--tpm", "5000", "--name", "acme-2", env=env)
        assert updated.returncode == 0, updated.stderr
        got = (await admin(http, "GET", f"/orgs/{org}")).json()
        assert got["name"] == "acme-2" and got["limits"]["tpm"] == 5000 and got["limits"]["tokens_per_day"] == 500

        created = (await admin(http, "POST", "/keys", json={"name": "k", "org": org, "limits": {"rpm": 10}})).json()
        key_id, old = created["id"], created["key"]
        r = await admin(http, "PATCH", f"/keys/{key_id}", json={"limits": {"tpm": 700}, "priority": "batch"})
        assert (
            r.status_code == 200 and r.json()["limits"] == {"rpm": 10, "tpm": 700} and r.json()["priority"] == "batch"
        )
        assert (await admin(http, "PATCH", f"/keys/{key_id}", json={"admin": True})).status_code == 400
        assert (await admin(http, "PATCH", "/keys/nope", json={"name": "x"})).status_code == 404
        changed = await cli("keys", "update", key_id, "--name", "renamed", "--rpm", "0", env=env)
        assert changed.returncode == 0 and "renamed" in changed.stdout, changed.stderr
        assert (await admin(http, "GET", f"/keys/{key_id}")).json()["limits"] == {"tpm": 700}

        rotated = await cli("keys", "rotate", key_id, env=env)
        assert rotated.returncode == 0, rotated.stderr
        new = next(line.split()[1] for line in rotated.stdout.splitlines() if line.startswith("key:"))
        assert new != old and new.startswith(f"ty_{key_id}_")
        async with openai.AsyncOpenAI(base_url=f"{echo_stack.api_url}/v1", api_key=new, max_retries=0) as c:
            await c.chat.completions.create(model=ECHO, messages=USER, max_tokens=1)  # type: ignore[arg-type]
        async with openai.AsyncOpenAI(base_url=f"{echo_stack.api_url}/v1", api_key=old, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model=ECHO, messages=USER, max_tokens=1)  # type: ignore[arg-type]
        deadline, actions = time.monotonic() + 10, set()
        while time.monotonic() < deadline and not {"key.update", "key.rotate", "org.update"} <= actions:
            actions = {row["action"] for row in (await admin(http, "GET", "/audit")).json()["data"]}
            await asyncio.sleep(0.2)
        assert {"key.update", "key.rotate", "org.update"} <= actions


async def test_tables_show_dates_and_fixed_point_costs_while_json_and_csv_stay_raw(echo_stack: Stack) -> None:
    env = {"TOKENYARD_API_URL": echo_stack.api_url, "TOKENYARD_ADMIN_KEY": ADMIN_KEY}
    assert cell("cost", 1.14e-05) == "0.000011" and cell("created", 0) == "" and cell("admin", False) == "no"
    created = await cli("keys", "create", "when", env=env)
    assert created.returncode == 0, created.stderr
    listed = await cli("keys", "list", env=env)
    assert time.strftime("%Y-%m-%d") in listed.stdout and "e-0" not in listed.stdout
    raw = json.loads((await cli("usage", "--format", "json", env=env)).stdout)
    assert raw["object"] == "list"
    record = {"time": 1764614829.5, "cost": 1.14e-05}
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
    assert human_time(record["time"]) == local and cell("cost", record["cost"]) == "0.000011"


async def test_an_idempotency_key_reused_with_another_body_is_refused(echo_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=echo_stack.api_url, timeout=30) as http:
        headers = {**auth_headers(), "Idempotency-Key": "order-42"}
        body = {"model": ECHO, "messages": USER, "max_tokens": 2}
        first = await http.post("/v1/chat/completions", json=body, headers=headers)
        again = await http.post("/v1/chat/completions", json={**body, "stream": False}, headers=headers)
        assert first.status_code == again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        other = await http.post("/v1/chat/completions", json={**body, "max_tokens": 3}, headers=headers)
        assert other.status_code == 400, other.text
        error = other.json()["error"]
        assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"


def test_each_adapter_needs_only_its_own_providers_keys(tmp_path: Path) -> None:
    example = REPO / "deploy" / "providers.example.yaml"
    config = load_providers(example, env={"OPENAI_API_KEY_1": "sk-a", "OPENAI_API_KEY_2": "sk-b"})
    assert [k.reveal() for k in config.get("openai").keys] == ["sk-a", "sk-b"]
    with pytest.raises(ProviderConfigError) as e:
        config.get("together")
    assert str(e.value).startswith(str(example)) and "TOGETHER_API_KEY" in str(e.value) and "export" in str(e.value)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1', api_keys: [{env: NOPE_KEY}], models: {m: m},"
            " prices: {m: {input: 1, output: 1}}}]",
            "NOPE_KEY",
        ),
        ("providers: [{name: p, base_url: 'http://10.0.0.1/v1', api_keys: [sk-x], models: {m: m}}]", "base_url"),
        ("providers: [{name: p, base_uri: x}]", "unknown key 'base_uri'"),
        ("providers: [", "not valid YAML"),
    ],
)
def test_a_worker_config_error_is_one_line_and_exit_code_2(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "worker", "--backend", "cloud", "--providers", str(path), "--provider", "p"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "TOKENYARD_NATS_URL": "nats://127.0.0.1:1",
            "TOKENYARD_METRICS_PORT": "0",
            "TOKENYARD_NODE_ID": "config-test",  # no node id file made (and logged) for this run
        },
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"tokenyard worker: {path}") and expect in lines[0] and "Traceback" not in r.stderr


def test_a_bad_routing_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    path.write_text('{"default": {"strategy": "fastest-ever"}}')
    r = subprocess.run(
        [sys.executable, "-m", "scheduler", "--routing-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TOKENYARD_METRICS_PORT": "0"},
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fastest-ever" in r.stderr, r.stderr


async def test_up_starts_an_adapter_per_provider_and_top_shows_the_stack(tmp_path: Path) -> None:
    port, metrics_port, data = free_port(), free_port(), tmp_path / "data"
    async with FakeProvider(models=("fake-model",)) as fp:
        providers = tmp_path / "providers.yaml"
        providers.write_text(yaml.safe_dump({"providers": [fp.config_entry("fakecloud")]}))
        log = tmp_path / "up.log"
        args = ["up", "--backend", "echo", "--port", str(port), "--data-dir", str(data), "--log-json"]
        args += ["--providers", str(providers), "--metrics-port", str(metrics_port)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*CLI, *args], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TOKENYARD_ADMIN_KEY": ""}
            )
        try:
            deadline = time.monotonic() + 90
            while "Tokenyard is up" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.2)
            assert "Tokenyard is up" in log.read_text(), log.read_text()
            assert (data / "api_url").read_text().strip() == f"http://127.0.0.1:{port}"
            key = (data / "admin_key").read_text().strip()
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as c:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and "fake-model" not in {m.id async for m in c.models.list()}:
                    await asyncio.sleep(0.2)
                r = await c.chat.completions.create(model="fake-model", messages=USER, max_tokens=3)  # type: ignore[arg-type]
                assert r.choices[0].message.content
                await c.chat.completions.create(model=ECHO, messages=USER, max_tokens=2)  # type: ignore[arg-type]
            listed = await cli("keys", "list", "--data-dir", str(data))  # no --api-url: `up`'s own
            assert listed.returncode == 0, listed.stderr
            top = await cli("top", "--once", "--interval", "0.5", "--data-dir", str(data))
            assert top.returncode == 0, top.stderr
            for shown in ("queues", "fakecloud", "own", "open breakers: none", "TTFT", "requests"):
                assert shown in top.stdout, top.stdout
            lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
            roles = {json.loads(line).get("role") for line in lines}
            assert {"api", "scheduler", "worker"} <= roles, roles
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(90)
    assert code == 0, log.read_text()[-3000:]
    assert not (data / "api_url").exists()
