"""Hostile clients and nodes: what the echo backend obeys from a prompt, and events forged by a
node for a job it was not dispatched (issue 11, case 11)."""

from __future__ import annotations

import time

import httpx

from tests.conftest import ECHO
from tests.stack import Stack, auth_headers


async def test_fault_directives_are_plain_text_without_the_flag(stack: Stack) -> None:
    """Any client may write `[[crash]]`: a worker not started with --echo-directives echoes it
    (and the delay, the failure and the death) as words; `[[tokens=N]]` still shapes the answer."""
    worker = stack.start_worker(TOKENYARD_ECHO_DIRECTIVES="0")
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    prompt = "[[crash]] [[fail]] [[delay=5]] [[die-after=1]] [[tokens=6]]"
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers(), timeout=30) as http:
        started = time.monotonic()
        r = await http.post(
            "/v1/chat/completions", json={"model": ECHO, "messages": [{"role": "user", "content": prompt}]}
        )
        took = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert (
            r.json()["choices"][0]["message"]["content"]
            == "[[crash]] [[fail]] [[delay=5]] [[die-after=1]] [[crash]] [[fail]]"
        )
        assert took < 4.0  # no delay obeyed
        assert worker.alive()
        r = await http.post(
            "/v1/chat/completions", json={"model": ECHO, "messages": [{"role": "user", "content": "again"}]}
        )
        assert r.status_code == 200, r.text
    assert worker.alive()
