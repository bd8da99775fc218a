"""SmolLM2 served through the whole stack (NATS, scheduler, a transformers worker process, the
API) to the official SDK: a sensible answer, plain and streamed, and `parse` with a pydantic
model (constrained decoding) giving a valid object."""

from __future__ import annotations

from pathlib import Path

import pydantic

from tests.helpers import sdk
from tests.stack import Stack

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Capital(pydantic.BaseModel):
    country: str
    capital: str


async def test_smollm2_through_the_stack(stack: Stack, smol_data_dir: Path) -> None:
    stack.start_worker(
        TOKENYARD_BACKEND="transformers",
        TOKENYARD_DATA_DIR=str(smol_data_dir),
        TOKENYARD_SLOTS="4",
        TOKENYARD_HEARTBEAT="0.5",
        TOKENYARD_ACK_WAIT="10",
    )
    await stack.start_api(request_timeout=120.0, attempt_silence=5.0)
    await stack.wait_for_model(MODEL, timeout=240)  # converts the GGUF on first use
    async with sdk(stack, timeout=120) as client:
        r = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
        assert "Paris" in (r.choices[0].message.content or ""), r.choices[0].message.content
        assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 40
        stream = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=40, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == r.choices[0].message.content  # greedy: the same answer either way
        parsed = await client.chat.completions.parse(
            model=MODEL, messages=QUESTION, response_format=Capital, max_tokens=60, temperature=0
        )
        assert isinstance(parsed.choices[0].message.parsed, Capital), parsed.choices[0].message.content
