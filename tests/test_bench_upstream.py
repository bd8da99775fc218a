"""The benchmark's fake upstream (`bench/fast_upstream.py`) speaks OpenAI as the official SDK
reads it: models, whole and streamed completions that validate against OpenAI's published
schemas, usage only when asked for, `max_tokens` honoured. Both of its servers. If it did not,
bench/peers.py would measure the systems against something no real client sends."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.openai_schema import validate

UPSTREAM = Path(__file__).resolve().parents[1] / "bench" / "fast_upstream.py"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["raw", "aiohttp"])
def upstream(request: pytest.FixtureRequest) -> Iterator[str]:
    port = _free_port()
    args = [sys.executable, str(UPSTREAM), "--port", str(port), "--tokens", "5", "--server", request.param]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"{base}/models", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fast_upstream did not start: {proc.stderr.read() if proc.stderr else ''}")
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(5)


async def test_models_and_plain_completion(upstream: str) -> None:
    async with openai.AsyncOpenAI(base_url=upstream, api_key="sk-any", max_retries=0, timeout=10) as client:
        assert [m.id for m in (await client.models.list()).data] == ["fast-model"]
        r = await client.chat.completions.create(model="fast-model", messages=[{"role": "user", "content": "hi"}])
        validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("tok " * 5, "stop")
        assert r.usage is not None and r.usage.completion_tokens == 5
        assert r.usage.total_tokens == r.usage.prompt_tokens + 5
        capped = await client.chat.completions.create(
            model="fast-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert (capped.choices[0].message.content, capped.choices[0].finish_reason) == ("tok " * 2, "length")


@pytest.mark.parametrize("include_usage", [True, False])
async def test_streamed_completion(upstream: str, include_usage: bool) -> None:
    async with openai.AsyncOpenAI(base_url=upstream, api_key="sk-any", max_retries=0, timeout=10) as client:
        for _ in range(2):  # the same keep-alive connection serves the next stream
            stream = await client.chat.completions.create(
                model="fast-model",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": include_usage},
            )
            text, finish, usage = "", [], []
            async for chunk in stream:
                validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
                if chunk.usage is not None:
                    assert chunk.choices == []
                    usage.append(chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    if choice.finish_reason:
                        finish.append(choice.finish_reason)
            assert (text, finish) == ("tok " * 5, ["stop"])
            assert usage == ([5] if include_usage else [])
