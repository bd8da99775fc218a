"""Hostile clients and nodes: what the echo backend obeys from a prompt, and events forged by a
node for a job it was not dispatched (issue 11, case 11)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from nats.aio.msg import Msg

from schemas import subjects
from tests.helpers import ECHO, Sse, wait_until
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


FORGER = """
import asyncio, secrets, sys, time
import nats
from schemas import subjects
from schemas.events import Delta, Done, Failed, Piece, Start

async def main(url, creds, gateway, job_id, node, seen_subject):
    nc = await nats.connect(url, user_credentials=creds or None)  # a node's own credentials
    targets = [
        subjects.reply_subject(gateway, job_id),  # where a job's events went before reply tokens
        subjects.reply_subject(gateway, secrets.token_hex(16)),  # a guessed token
        seen_subject,  # the reply subject of another job this node ran
    ]
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for subject in targets:
            for attempt in (0, 1001, 1002, 2001):
                await nc.publish(subject, Start(job_id, attempt, 0, node).encode())
                for seq in range(0, 40):
                    piece = (Piece(0, " INJECTED", 1),)
                    await nc.publish(subject, Delta(job_id, attempt, seq, node, piece).encode())
                done = Done(job_id, attempt, 40, node, finish=("stop",), prompt_tokens=1, completion_tokens=1)
                await nc.publish(subject, done.encode())
                failed = Failed(job_id, attempt, 41, node, error={"kind": "server"}, retryable=False)
                await nc.publish(subject, failed.encode())
        await nc.flush()
        await asyncio.sleep(0.05)
    await nc.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_events_forged_for_a_running_job_do_not_reach_its_client(stack: Stack, tmp_path: Path) -> None:
    """A second process that knows the gateway, the job's id and its node publishes starts,
    deltas, a done and a failure for every likely attempt, while the job streams: the client's
    answer is exactly the worker's, and the worker is not told to stop (issue 11, case 11e)."""
    stack.start_worker(TOKENYARD_NODE_ID="victim-node")
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    nc = await stack.bus()
    seen: list[str] = []  # the forger's node ran one job of this gateway: it saw its reply subject

    async def remember(msg: Msg) -> None:
        seen.append(msg.subject)

    sniff = await nc.subscribe(subjects.reply_inbox("*"), cb=remember)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers(), timeout=30) as http:
        first = {"model": ECHO, "messages": [{"role": "user", "content": "a"}]}
        r = await http.post("/v1/chat/completions", json=first)
        assert r.status_code == 200
        # the sniffer's own connection may hear the job's events after the answer came back
        # (under load, it had heard nothing yet when asked at once)
        assert await wait_until(lambda: bool(seen), 10.0)
        await sniff.unsubscribe()
        gateway = seen[0].split(".")[2]
        words = "alpha beta gamma delta"
        body = {
            "model": ECHO,
            "messages": [{"role": "user", "content": f"{words} [[tokens=40]] [[rate=20]]"}],
            "stream": True,
        }
        forgers: list[subprocess.Popen[bytes]] = []

        def forge_once_it_streams(sse: Sse) -> bool:
            """On the job's first chunk the forger starts; an error event ends the reading."""
            if not forgers and sse.error is None:
                script = tmp_path / "forger.py"
                script.write_text(FORGER)
                job_id = sse.id.removeprefix("chatcmpl-")
                args = [stack.nats_url, stack.creds("worker"), gateway, job_id, "victim-node", seen[0]]
                forgers.append(subprocess.Popen([sys.executable, str(script), *args], env={**os.environ}))
            return sse.error is not None

        sse = await Sse().read(http, "/v1/chat/completions", body, until=forge_once_it_streams, timeout=30)
        assert sse.status == 200
        assert sse.error is None, sse.events
        assert all(c.get("finish_reason") in (None, "length", "stop") for e in sse.events for c in e.get("choices", ()))
        assert forgers and forgers[0].wait(30) == 0
    expected = " ".join((words.split() * 10)[:40])
    assert sse.text == expected
