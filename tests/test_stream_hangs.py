"""Issue 11, case 4: streams through a cloud adapter under load must all end.

300 streams, 32 at once, through one cloud-adapter worker to the fake provider, whose first
chunk comes about when the worker's "started" timer fires (`worker.runtime.START_DELAY`): the
moment where the worker's Start event and its first Delta raced for sequence order. The
gateway's attempt silence is three of the worker's heartbeats, so on a loaded machine some
attempts are taken for dead and re-dispatched while they run: the same worker then holds two
attempts of one job. Every stream must end with the whole answer well within the request's
deadline. (The silence was once one heartbeat: no margin at all, so at load ~14 on two cores a
stalled second after a stream's first token ended it with "the worker stopped responding", as
the gateway must when a started answer's only node goes quiet; on a quiet machine it re-dispatched
nothing either way.)

`TOKENYARD_TEST_STREAMS=4000` runs the long version by hand (bench/RESULTS.md).

And whatever a worker does, no accepted stream goes quiet without an error event: a worker that
stays alive and heartbeats but sends nothing more (a hung backend) is given up on after the
gateway's `--stream-idle-timeout`, and the stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import yaml

from tests.fake_provider import Behaviour, FakeProvider
from tests.helpers import ECHO, Sse, watch_adverts
from tests.stack import Stack, auth_headers

MODEL = "fake-model"
STREAMS = int(os.environ.get("TOKENYARD_TEST_STREAMS", "300"))  # the long run by hand: bench/RESULTS.md
AT_ONCE = 32
CHUNKS = tuple(f" t{i}" for i in range(16))


async def one_stream(http: httpx.AsyncClient, i: int) -> tuple[str, float, str]:
    """(text, seconds, error or "") of one streamed request; an answer that does not end with
    finish_reason "stop" is an error too."""
    started = time.monotonic()
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"stream {i}"}], "stream": True}
    sse, error = Sse(), ""
    try:
        await sse.read(http, "/v1/chat/completions", body, until=lambda s: s.error is not None, timeout=60)
    except (httpx.HTTPError, TimeoutError) as e:
        error = f"{type(e).__name__}: {e}"
    if sse.status not in (0, 200):
        return "", time.monotonic() - started, f"HTTP {sse.status}: {sse.body[:200]!r}"
    if sse.error is not None:
        error = sse.error["message"]
    if not error and sse.finish != "stop":
        error = f"finish_reason {sse.finish!r}"
    return sse.text, time.monotonic() - started, error


async def test_cloud_streams_under_load_all_end(stack: Stack, tmp_path: Path) -> None:
    # Headers and the first chunk ~50 ms after the request: the worker's START_DELAY.
    behaviour = Behaviour(chunks=CHUNKS, delay=0.045)
    async with FakeProvider(behaviour, models=(MODEL,)) as provider:
        config = {"providers": [provider.config_entry("prov-a", max_concurrency=64)]}
        providers = tmp_path / "providers.yaml"
        providers.write_text(yaml.safe_dump(config))
        stack.start_worker(
            TOKENYARD_BACKEND="cloud",
            TOKENYARD_PROVIDERS=str(providers),
            TOKENYARD_PROVIDER="prov-a",
            TOKENYARD_SLOTS="64",
            TOKENYARD_NODE_ID="cloud-a",
            TOKENYARD_HEARTBEAT="1.0",
            TOKENYARD_ACK_WAIT="5",
            TOKENYARD_COALESCE_MS="20",
        )
        _, url = await stack.spawn_api(
            TOKENYARD_REQUEST_TIMEOUT="30", TOKENYARD_LEDGER="false", TOKENYARD_ATTEMPT_SILENCE="3.0"
        )
        stack.api_url = url
        await stack.wait_for_model(MODEL)
        limits = httpx.Limits(max_connections=AT_ONCE, max_keepalive_connections=AT_ONCE)
        async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=40, limits=limits) as http:
            gate = asyncio.Semaphore(AT_ONCE)

            async def bounded(i: int) -> tuple[str, float, str]:
                async with gate:
                    return await one_stream(http, i)

            started = time.monotonic()
            async with asyncio.timeout(max(240, STREAMS / 5)):
                results = await asyncio.gather(*(bounded(i) for i in range(STREAMS)))
            took = time.monotonic() - started
    expected = "".join(CHUNKS)
    slow = [(i, round(s, 1), e) for i, (_, s, e) in enumerate(results) if s > 10]
    seconds = sorted(s for _, s, _ in results)
    print(
        f"\n{len(results)} streams, {AT_ONCE} at once, in {took:.1f} s ({len(results) / took:.0f}/s): "
        f"p50 {seconds[len(seconds) // 2]:.3f} s, max {seconds[-1]:.3f} s, over 10 s: {len(slow)}"
    )
    wrong = [(i, t, e) for i, (t, _, e) in enumerate(results) if t != expected or e]
    assert not slow, f"{len(slow)} of {STREAMS} streams took over 10 s: {slow[:5]}"
    assert not wrong, f"{len(wrong)} of {STREAMS} streams did not end with the whole answer: {wrong[:5]}"


async def test_a_stream_whose_worker_hangs_ends_with_an_error_event(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="4", TOKENYARD_HEARTBEAT="0.3")
    # Only the idle bound may end it: the attempt silence is far beyond the 0.3 s heartbeats, so a
    # loaded machine's stalled second never passes for a dead worker (at the stack's 1 s it did).
    _, url = await stack.spawn_api(
        TOKENYARD_STREAM_IDLE_TIMEOUT="2", TOKENYARD_REQUEST_TIMEOUT="60", TOKENYARD_ATTEMPT_SILENCE="10"
    )
    stack.api_url = url
    await stack.wait_for_model(ECHO)
    adverts = await watch_adverts(stack)
    body = {
        "model": ECHO,
        "messages": [{"role": "user", "content": "one two three [[tokens=50]] [[rate=50]] [[hang-after=5]]"}],
        "stream": True,
    }
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=70) as http:
        sse = await Sse().read(http, "/v1/chat/completions", body, until=lambda s: s.error is not None, timeout=70)
    assert sse.status == 200
    text, error = sse.text, (sse.error or {}).get("message", "")
    last = max((t for t, e in zip(sse.times, sse.events) if "error" not in e), default=started)
    took = time.monotonic() - started
    # the worker heartbeats all along, so only the idle bound ends it: well before the 60 s deadline
    assert text.split() == ["one", "two", "three", "one", "two"], text
    assert "no output for 2 s" in error, error
    assert took - (last - started) < 2 + 8.0 and took < 30, took
    # and the hung attempt was stopped on its worker
    assert await adverts.wait(lambda a: a and all(n.slots_free == 4 for n in a.values()), 15.0)
