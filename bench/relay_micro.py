"""The cloud adapter's parsing of one 16-token streamed answer (19 SSE events, as
bench/fast_upstream.py sends it) through worker.cloud_answer, in microseconds: what a JSON
library change saves per stream, without the noise of a whole-stack run.

    .venv/bin/python bench/relay_micro.py
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cloud_answer import SseDecoder, StreamState  # noqa: E402


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    o: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        o["usage"] = usage
    return b"data: " + json.dumps(o).encode() + b"\n\n"


RAW = (
    chunk({"role": "assistant", "content": ""})
    + b"".join(chunk({"content": f"tok{i} "}) for i in range(16))
    + chunk({}, "stop")
    + chunk({}, usage={"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25})
    + b"data: [DONE]\n\n"
)
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def once() -> None:
    s, d = StreamState(1), SseDecoder()
    for data in d.feed(RAW):
        s.event(data)
    list(s.end(REQUEST))


if __name__ == "__main__":
    n = 3000
    print(f"{timeit.timeit(once, number=n) / n * 1e6:.1f} us per 16-token answer")
