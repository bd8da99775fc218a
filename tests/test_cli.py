"""The `tokenyard` command: `up` runs the whole stack and stops it cleanly; the admin commands
manage keys and read usage through a running gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.helpers import CLI, ECHO, tokenyard
from tests.stack import ADMIN_KEY, Stack, auth_headers, free_port


def test_help_and_unknown_command() -> None:
    r = tokenyard("--help")
    assert r.returncode == 0 and "tokenyard up" in r.stdout
    r = tokenyard("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
    # `python -m broker_api.cli` is the same command (how a checkout without the script runs it)
    r = subprocess.run([sys.executable, "-m", "broker_api.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "tokenyard up" in r.stdout, r


async def test_up_serves_the_sdk_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "up", "--backend", "echo", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENYARD_ADMIN_KEY": ""},
        )
    try:
        deadline = time.monotonic() + 60
        while "Tokenyard is up" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.2)
        text = log.read_text()
        assert "Tokenyard is up" in text, text
        key = (tmp_path / "data" / "admin_key").read_text().strip()
        assert key in text and f"http://127.0.0.1:{port}/v1" in text
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as c:
            r = await c.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "up and running"}], max_tokens=3
            )
            assert r.choices[0].message.content == "up and running"
            stream = await c.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "s"}], max_tokens=2, stream=True
            )
            assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices]) == "s s"
        # usage reports come from the ledger process `up` started (the API keeps no ledger of its own)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth_headers(key)) as http:
            while time.monotonic() < deadline + 30:
                report = await http.get("/v1/admin/usage")
                if report.status_code == 200 and sum(r["requests"] for r in report.json()["data"]) == 2:
                    break
                await asyncio.sleep(0.2)
            assert report.status_code == 200 and sum(r["requests"] for r in report.json()["data"]) == 2, report.text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()
    # every child is gone: nothing listens on the port any more
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


async def test_admin_commands(echo_stack: Stack) -> None:
    env = {"TOKENYARD_API_URL": echo_stack.api_url, "TOKENYARD_ADMIN_KEY": ADMIN_KEY}
    created = await asyncio.to_thread(tokenyard, "keys", "create", "ci-key", "--rpm", "100", env=env)
    assert created.returncode == 0, created.stderr
    secret = next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("key:"))
    key_id = secret.split("_")[1]
    async with openai.AsyncOpenAI(base_url=f"{echo_stack.api_url}/v1", api_key=secret, max_retries=0) as c:
        await c.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "cli"}], max_tokens=1)
    listed = await asyncio.to_thread(tokenyard, "keys", "list", env=env)
    assert key_id in listed.stdout and secret not in listed.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        usage = await asyncio.to_thread(tokenyard, "usage", "--by", "key", "--format", "csv", env=env)
        if key_id in usage.stdout:
            break
        await asyncio.sleep(0.2)
    assert usage.stdout.splitlines()[0].startswith("key,requests")
    assert f"{key_id},1," in usage.stdout
    revoked = await asyncio.to_thread(tokenyard, "keys", "revoke", key_id, env=env)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    bad = await asyncio.to_thread(tokenyard, "keys", "revoke", "nope", env=env)
    assert bad.returncode != 0 and "404" in bad.stderr
