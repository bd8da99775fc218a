"""An asyncio load generator on aiohttp for OpenAI-compatible chat completions.

`run_cell` sends up to `requests` requests, `concurrency` at once (each client sends its next
request when its last one ended), for at most `seconds`, and records per request: latency (send
to last byte), for streams the time to the first content chunk (TTFT) and the gaps between
content chunks, and what went wrong, if anything. An answer counts as an error unless it is a
200 whose text is the expected text (a stream must also end with `data: [DONE]`); a request that
has not ended `timeout` seconds after it was sent counts as `timeout` (a hung stream).

aiohttp rather than httpx: httpx as a load client tops out near 500 requests/s on this machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(slots=True)
class Sample:
    latency: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str = ""
    salt: int = -1  # which request (its prompt's number), to find it in a trace
    sent: float = 0.0  # perf_counter() when it was sent


@dataclass(slots=True)
class Cell:
    """What one run of one cell measured (times in seconds)."""

    samples: list[Sample]
    wall: float
    client_cpu: float  # this process's CPU seconds during the cell
    started: float = 0.0  # perf_counter() at the start

    def answering_seconds(self) -> float:
        """From the start to the end of the last good answer: the wall time without the wait
        for requests that hung (they end only at the timeout)."""
        ends = [s.sent + s.latency for s in self.ok]
        return max(ends) - self.started if ends else self.wall

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if not s.error]

    def errors(self) -> dict[str, int]:
        return dict(Counter(s.error for s in self.samples if s.error))


def chat_body(model: str, stream: bool, tokens: int, salt: int = 0) -> dict[str, Any]:
    """A chat request; `salt` makes each prompt distinct (nothing may answer from a cache)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"the quick brown fox jumps over the lazy dog {salt}"}],
        "max_tokens": tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _plain(session: aiohttp.ClientSession, url: str, body: bytes, expected: str | None, started: float) -> Sample:
    async with session.post(url, data=body) as r:
        data = await r.read()
        end = time.perf_counter()
        if r.status != 200:
            return Sample(end - started, error=f"http {r.status}")
    try:
        text = json.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return Sample(end - started, error="bad body")
    return Sample(end - started, error="" if _right(text, expected) else "wrong text")


def _right(text: object, expected: str | None) -> bool:
    return text == expected if expected is not None else isinstance(text, str) and bool(text)


async def _stream(
    session: aiohttp.ClientSession, url: str, body: bytes, expected: str | None, started: float
) -> Sample:
    parts: list[str] = []
    arrivals: list[float] = []
    done = False
    async with session.post(url, data=body) as r:
        if r.status != 200:
            await r.read()
            return Sample(time.perf_counter() - started, error=f"http {r.status}")
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                return Sample(time.perf_counter() - started, error="bad chunk")
            if chunk.get("error"):
                return Sample(time.perf_counter() - started, error="error event")
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    arrivals.append(time.perf_counter())
        end = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    sample = Sample(end - started, arrivals[0] - started if arrivals else None, gaps)
    if not done:
        sample.error = "no [DONE]"
    elif not _right("".join(parts), expected):
        sample.error = "wrong text"
    return sample


async def one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], expected: str | None, timeout: float, salt: int = -1
) -> Sample:
    raw = json.dumps(body).encode()
    started = time.perf_counter()
    call = _stream if body.get("stream") else _plain
    try:
        async with asyncio.timeout(timeout):
            sample = await call(session, url, raw, expected, started)
    except TimeoutError:
        sample = Sample(time.perf_counter() - started, error="timeout")
    except aiohttp.ClientError as e:
        sample = Sample(time.perf_counter() - started, error=type(e).__name__)
    sample.salt, sample.sent = salt, started
    return sample


def session_for(key: str) -> aiohttp.ClientSession:
    # no connection limit: a stuck request keeps its connection while its client goes on
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    )


async def run_cell(
    base_url: str,
    key: str,
    model: str,
    *,
    stream: bool,
    tokens: int,
    requests: int,
    concurrency: int,
    seconds: float,
    min_seconds: float = 0.0,
    timeout: float = 60.0,
    stuck: float = 5.0,
    warmup: int = 50,
    expected: str | None = "",
    on_lanes_done: Callable[[], None] | None = None,
) -> Cell:
    """See the module docstring. `base_url` ends in /v1. A cell goes on past `requests` until
    `min_seconds` have passed (CPU time is counted in 10 ms ticks: a short cell of a fast system
    would measure nothing), and never past `seconds`. `expected`: the answer's text ("": the
    fast upstream's answer of `tokens` tokens; None: any text will do).

    A request still going after `stuck` seconds is left to finish (or time out) on its own and
    its client sends the next one, so a hung request does not take its client out of the load:
    `concurrency` requests stay in flight that are not stuck. `on_lanes_done` is called when the
    clients stopped, before the wait for stuck requests (where a caller reads CPU counters)."""
    url = f"{base_url}/chat/completions"
    if expected == "":
        expected = "tok " * tokens
    counter = iter(range(10**12))
    async with session_for(key) as session:
        await asyncio.gather(
            *(
                one(session, url, chat_body(model, stream, tokens, i := next(counter)), expected, timeout, i)
                for _ in range(warmup)
            )
        )
        samples: list[Sample] = []
        budget = [requests]
        cpu0 = time.process_time()
        started = time.perf_counter()
        stop_at = started + seconds
        go_on_until = started + min(min_seconds, seconds)

        def more() -> bool:
            now = time.perf_counter()
            return now < stop_at and (budget[0] > 0 or now < go_on_until)

        left: list[asyncio.Task[Sample]] = []

        async def client() -> None:
            while more():
                budget[0] -= 1
                i = next(counter)
                body = chat_body(model, stream, tokens, i)
                task = asyncio.ensure_future(one(session, url, body, expected, timeout, i))
                done, _ = await asyncio.wait({task}, timeout=stuck)
                if done:
                    samples.append(task.result())
                else:
                    left.append(task)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        if on_lanes_done is not None:
            on_lanes_done()
        samples += await asyncio.gather(*left)
    return Cell(samples, wall, cpu, started)
