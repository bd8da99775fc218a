"""Stored Responses API answers larger than one NATS message (1 MiB): kept in parts, read back
by `GET` and `previous_response_id`, and gone with a delete or the bucket's TTL, head and parts
alike; a conversation too long for one job is refused as such (413). The official `openai` SDK
against a real stack (echo worker, nats-server)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import openai
import pytest

from broker_api.response_store import ResponseStore
from schemas import streams, subjects
from schemas.jetstream import open_bucket
from schemas.responses import StoredResponse
from tests.helpers import ECHO, eventually, sdk
from tests.stack import Stack

pytestmark = pytest.mark.asyncio

WORD = "w" * 999  # one echo token, 1,000 bytes with its space
LONG = f"{WORD} [[tokens=600]]"  # ~600 KB of answer: stored twice (the response, the conversation) > 1 MiB
MIB = 1 << 20


async def _bucket_bytes(stack: Stack) -> int:
    nc = await stack.connect()
    try:
        info = await nc.jetstream().stream_info(f"KV_{subjects.RESPONSES_BUCKET}")
        return int(info.state.bytes)
    finally:
        await nc.close()


async def test_a_response_larger_than_a_message_is_stored_read_continued_and_deleted(
    client: openai.AsyncOpenAI, echo_stack: Stack
) -> None:
    big = await client.responses.create(model=ECHO, input=LONG)
    assert len(big.output_text) > 590_000
    assert await _bucket_bytes(echo_stack) > MIB  # really more than one message holds
    got = await client.responses.retrieve(big.id)
    assert got.id == big.id and got.output_text == big.output_text
    # the follow-up carries the whole stored conversation (~600 KB: it fits one job)
    more = await client.responses.create(model=ECHO, input="again [[tokens=3]]", previous_response_id=big.id)
    assert more.output_text == "again again again"
    assert more.usage is not None and more.usage.input_tokens > 600  # the 600 words before were in its prompt
    # streamed, a large one is kept the same way; continued once more its conversation (~1.2 MB)
    # outgrows what one job may carry: refused, saying so, and not as "not found"
    async with client.responses.stream(model=ECHO, input=LONG, previous_response_id=big.id) as stream:
        longer = await stream.get_final_response()
    assert (await client.responses.retrieve(longer.id)).output_text == longer.output_text
    with pytest.raises(openai.APIStatusError) as refused:
        await client.responses.create(model=ECHO, input="x", previous_response_id=longer.id)
    assert refused.value.status_code == 413 and "one job may have" in refused.value.message
    for gone in (big, longer):
        await client.responses.delete(gone.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(big.id)
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=ECHO, input="x", previous_response_id=big.id)
    # the follow-up holds the conversation too (~600 KB, one entry) and stands on its own
    assert (await client.responses.retrieve(more.id)).output_text == more.output_text
    await client.responses.delete(more.id)
    assert await _bucket_bytes(echo_stack) < 64 * 1024  # the parts went with their heads


async def test_large_and_small_stored_responses_expire_with_the_buckets_ttl(stack: Stack) -> None:
    stack.start_worker()
    await stack.start_api(responses_ttl=3.0)
    await stack.wait_for_model(ECHO)
    client = sdk(stack)
    try:
        big = await client.responses.create(model=ECHO, input=LONG)
        small = await client.responses.create(model=ECHO, input="hi")
        assert (await client.responses.retrieve(big.id)).output_text == big.output_text

        async def gone() -> bool:
            for resp in (big, small):
                try:
                    await client.responses.retrieve(resp.id)
                    return False
                except openai.NotFoundError:
                    pass
            return await _bucket_bytes(stack) == 0

        assert await eventually(gone, timeout=30.0, every=0.5)
    finally:
        await client.close()


async def test_a_large_response_the_bucket_cannot_hold_leaves_no_parts_behind(
    client: openai.AsyncOpenAI, echo_stack: Stack
) -> None:
    """Room for one part, not three: the answer still reaches the client, it is not stored
    (404, as a full bucket always answered), and the part that was written is gone."""
    nc = await echo_stack.connect()
    try:
        js = nc.jetstream()
        config = (await js.stream_info(f"KV_{subjects.RESPONSES_BUCKET}")).config
        config.max_bytes = 800 * 1024
        await js.update_stream(config)
    finally:
        await nc.close()
    big = await client.responses.create(model=ECHO, input=LONG)
    assert len(big.output_text) > 590_000
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(big.id)
    assert await _bucket_bytes(echo_stack) < 64 * 1024


async def test_a_store_cancelled_while_its_parts_are_written_leaves_none(stack: Stack) -> None:
    """The client of a non-streamed request leaves while its large response is being stored in
    parts: the request (and the store) is cancelled, and the parts already written, which no head
    names, are purged rather than kept until the TTL."""
    nc = await stack.connect()
    try:
        kv = await open_bucket(nc, nc.jetstream(), streams.RESPONSES, replicas=None)
        store = ResponseStore(kv, max_payload=lambda: 44_096)  # 60 parts of 40,000, 8 at a time
        stored = StoredResponse({"id": "resp_cancelled"}, [{"role": "user", "content": "x" * 2_399_900}])
        cancelled = False
        for attempt in range(5):  # bounded: a put that finished before the cancel proves nothing
            put = asyncio.create_task(store.put("org", "proj", f"resp_c{attempt}", stored))
            assert await eventually(lambda: _bucket_holds(nc, lambda b: b > 0), timeout=10, every=0)
            put.cancel()
            try:
                await put
            except asyncio.CancelledError:
                cancelled = True
                break
            await store.delete("org", "proj", f"resp_c{attempt}")
        assert cancelled, "every put finished before it could be cancelled"
        # what stays is the purge markers (~100 bytes a key), not the parts (>= 8 x 40,000 bytes)
        assert await eventually(lambda: _bucket_holds(nc, lambda b: b < 64 * 1024), timeout=10)
    finally:
        await nc.close()


async def _bucket_holds(nc: Any, ok: Callable[[int], bool]) -> bool:
    info = await nc.jetstream().stream_info(f"KV_{subjects.RESPONSES_BUCKET}")
    return ok(int(info.state.bytes))
