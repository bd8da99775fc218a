"""Standing pull requests (worker/feed.py) when a worker serves more models than it has slots:
every model still gets its turn, so no model's jobs wait out their deadline on an idle worker."""

from __future__ import annotations

import asyncio

from tests.helpers import sdk
from tests.stack import Stack

MODELS = [f"m{i}" for i in range(12)]


async def test_a_worker_with_fewer_slots_than_models_serves_every_model(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_SLOTS="3", TOKENYARD_MODELS=",".join(MODELS))
    await stack.start_api()
    await stack.wait_for_model(MODELS[-1])
    async with sdk(stack) as client:
        # one model at a time, each job alone in the queue: before, models past the first three
        # (by slots) never had a pull request standing and their jobs timed out
        for model in MODELS:
            async with asyncio.timeout(15):
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"hello {model}"}], max_tokens=2
                )
            assert r.choices[0].message.content == f"hello {model}"
