"""Helpers several test modules share: clients for a running stack, the admin API, the
ledger, the fleet's adverts, simulated nodes and submissions for the scheduler tests, bounded
waits, and one reader of streamed (SSE) answers. Test modules import from here (and from
`tests.stack`), never from each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from nats.aio.client import Client as NATS

from schemas import subjects
from schemas.jobs import Admission, Job, ModelAdvert, NodeAdvert, Submission
from schemas.usage import UsageRecord
from tests.stack import ADMIN_KEY, Stack, auth_headers

ECHO = "tokenyard/echo"  # the echo backend's model
MODEL = "lim/model"  # the model the scheduler tests' simulated nodes serve

# The CLI as a subprocess, on this interpreter.
CLI = [sys.executable, "-c", "import sys; from broker_api.cli import main; main(sys.argv[1:])"]


def tokenyard(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


# --- waiting ----------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` every 10 ms for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def end_leftover_tasks(timeout: float = 10.0) -> list[str]:
    """Cancel what still runs in this loop besides the caller (what a test or its stack left
    behind) and give it `timeout` seconds to end. Those that do not end are named, with where
    they wait, on stdout and returned: the loop's own teardown would wait on them for ever (a
    full run was once stuck there), and this way the timeout's report says which they were."""
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in left:
        t.cancel()
    if left:
        await asyncio.wait(left, timeout=timeout)
    stuck = [t for t in left if not t.done()]
    for t in stuck:
        print(f"a task left running did not end {timeout:g} s after it was cancelled: {t!r}")
        t.print_stack(file=sys.stdout)
    return [t.get_name() for t in stuck]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(every)
    return False


# --- a running stack, from outside ------------------------------------------------------------


def sdk(stack: Stack, timeout: float = 30, url: str = "") -> openai.AsyncOpenAI:
    """The official client on the stack's (or `url`'s) gateway, with the admin key, no retries."""
    return openai.AsyncOpenAI(base_url=f"{url or stack.api_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=timeout)


async def admin(http: httpx.AsyncClient, method: str, path: str, key: str = ADMIN_KEY, **kw: Any) -> httpx.Response:
    return await http.request(method, f"/v1/admin{path}", headers=auth_headers(key), **kw)


async def new_key(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await admin(http, "POST", "/keys", json={"name": "test", **body})
    assert r.status_code == 201, r.text
    return r.json()


async def wait_rows(http: httpx.AsyncClient, count: int, timeout: float = 10.0, **params: str) -> list[dict[str, Any]]:
    """The ledger's usage rows once it holds at least `count` of them."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        r = await admin(http, "GET", "/usage/export", params={"format": "json", **params})
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"ledger has {len(rows)} rows, expected {count}: {rows}")


# --- streamed answers --------------------------------------------------------------------------


@dataclass
class Sse:
    """What a test needs from one streamed answer, as far as it has come: every event's JSON in
    order (and when each came), whether `[DONE]` came, the error event's `error` object, and the
    text, finish reason and usage of the chat chunks among them. `read` fills it from the raw
    SSE of an HTTP response, `drain` from the official SDK's stream; both are bounded in time
    and keep what came when they raise (a cut connection, the SDK's error for an error event,
    the time bound), so a test sees the answer so far either way."""

    status: int = 0  # the HTTP status (0: no response yet)
    body: bytes = b""  # the body of an answer that is not a 200 stream
    events: list[dict[str, Any]] = field(default_factory=list)  # every event but [DONE], in order
    times: list[float] = field(default_factory=list)  # the monotonic time each event came
    done: bool = False  # the [DONE] line came
    error: dict[str, Any] | None = None  # the first error event's `error` object
    text: str = ""  # the chat chunks' delta content, every choice's in arrival order
    finish: str | None = None  # the last finish reason a chunk carried
    usage: dict[str, Any] | None = None  # the last usage a chunk carried

    @property
    def id(self) -> str:
        """The answer's id, as its first event carrying one has it ("" before)."""
        return next((e["id"] for e in self.events if isinstance(e.get("id"), str)), "")

    @property
    def texts(self) -> int:
        """How many chat chunks so far carried text (in their first choice)."""
        return sum(1 for e in self.events if (e.get("choices") or [{}])[0].get("delta", {}).get("content"))

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.times.append(time.monotonic())
        if "error" in event and self.error is None:
            self.error = event["error"]
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            self.text += (choice.get("delta") or {}).get("content") or ""
            self.finish = choice.get("finish_reason") or self.finish

    async def read(
        self,
        http: httpx.AsyncClient,
        path: str,
        body: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
        until: Callable[[Sse], bool] | None = None,
        timeout: float = 60.0,
    ) -> Sse:
        """POST `body` to `path` and read the SSE answer to its end, or until `until(self)`
        (asked after each event) is true, within `timeout` seconds in all (else TimeoutError).
        A status other than 200 reads the body whole instead."""
        async with asyncio.timeout(timeout), http.stream("POST", path, json=body, headers=headers) as r:
            self.status = r.status_code
            if r.status_code != 200:
                self.body = await r.aread()
                return self
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    continue
                self.add(json.loads(line[6:]))
                if until is not None and until(self):
                    break
        return self

    async def drain(
        self, stream: AsyncIterator[Any], *, until: Callable[[Sse], bool] | None = None, timeout: float = 60.0
    ) -> Sse:
        """Read the SDK's stream (of chunks with `model_dump()`) to its end, or until
        `until(self)` is true, within `timeout` seconds. The SDK raises an error event as
        `openai.APIError`, after the chunks before it were added here."""
        async with asyncio.timeout(timeout):
            async for chunk in stream:
                self.add(chunk.model_dump())
                if until is not None and until(self):
                    break
        return self


class Adverts:
    """The latest advert of every worker, read off the fleet subject."""

    def __init__(self) -> None:
        self.latest: dict[str, NodeAdvert] = {}

    async def on_advert(self, msg: Any) -> None:
        advert = NodeAdvert.decode(msg.data)
        self.latest[advert.node] = advert

    async def wait(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.latest):
                return True
            await asyncio.sleep(0.02)
        return False


async def watch_adverts(stack: Stack) -> Adverts:
    adverts = Adverts()
    await (await stack.bus()).subscribe(subjects.FLEET_HEARTBEAT_ALL, cb=adverts.on_advert)
    return adverts


# --- the scheduler without workers ------------------------------------------------------------


class FakeNodes:
    """Publishes NodeAdverts for simulated nodes and answers roll calls, like real workers."""

    def __init__(self, nc: NATS, adverts: list[NodeAdvert]) -> None:
        self.nc = nc
        self.adverts = {a.node: a for a in adverts}
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> None:
        for a in self.adverts.values():
            await self.nc.publish(subjects.fleet_heartbeat(a.node), a.encode())
        await self.nc.flush()

    async def start(self) -> FakeNodes:
        async def on_roll_call(_: Any) -> None:
            await self.publish()

        await self.nc.subscribe(subjects.FLEET_ROLL_CALL, cb=on_roll_call)
        await self.publish()

        async def forever() -> None:
            while True:
                await asyncio.sleep(0.2)
                await self.publish()

        self._task = asyncio.create_task(forever())
        return self

    def set(self, advert: NodeAdvert) -> None:
        self.adverts[advert.node] = advert

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()


def node(
    name: str,
    pool: str = "own",
    *,
    model: str = MODEL,
    slots: int = 4,
    free: int | None = None,
    kind: str = "own",
    healthy: bool = True,
    price: tuple[float, float] = (0.0, 0.0),
    interval: float = 0.2,
) -> NodeAdvert:
    """A node's advert; the scheduler takes the node for gone after three `interval`s without one
    (FakeNodes sends one every 0.2 s, whatever the advert says)."""
    return NodeAdvert(
        node=name,
        pool=pool,
        models=(ModelAdvert(model, 4096, "t", *price),),
        slots_total=slots,
        slots_free=slots if free is None else free,
        interval=interval,
        kind=kind,  # type: ignore[arg-type]
        healthy=healthy,
    )


def job(
    job_id: str, *, model: str = MODEL, deadline: float = 60.0, dispatch: int = 1, request: dict[str, Any] | None = None
) -> Job:
    return Job(
        id=job_id,
        model=model,
        request=request or {"model": model, "messages": []},
        reply=subjects.reply_subject("test", job_id),
        deadline=time.time() + deadline,
        dispatch=dispatch,
    )


async def submit(nc: NATS, sub: Submission, timeout: float = 10.0) -> Admission:
    return Admission.decode((await nc.request(subjects.SCHED_SUBMIT, sub.encode(), timeout=timeout)).data)


async def publish_usage(
    nc: NATS,
    job_id: str,
    *,
    key: str = "",
    org: str = "",
    tokens: tuple[int, int] = (0, 0),
    reserved: int = 0,
    outcome: str = "ok",
    route: str = "own",
    status: int = 200,
    cost: float = 0.0,
    ttft_ms: float = 0.0,
    duration_ms: float = 0.0,
    node: str = "n",
    model: str = MODEL,
) -> None:
    """A usage record on the usage stream, as a gateway publishes it."""
    record = UsageRecord(
        job_id=job_id,
        time=time.time(),
        org=org,
        project="",
        key_id=key,
        model=model,
        route=route,
        node=node,
        attempts=1,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        cached_tokens=0,
        cost=cost,
        ttft_ms=ttft_ms,
        duration_ms=duration_ms,
        outcome=outcome,  # type: ignore[arg-type]
        status=status,
        reserved_tokens=reserved,
    )
    await nc.jetstream().publish(subjects.usage_subject(job_id), record.encode(), headers={"Nats-Msg-Id": job_id})
