"""`Idempotency-Key`: the same key twice (per org) runs one job.

The first request with a key claims it atomically (`kv.create` fails if the key exists) and
runs; when it succeeds its answer is stored under the key, and any later request with the
same key gets that answer replayed (streamed or not, as it asks) without running anything or
being billed again. A request that arrives while the first still runs waits for it. If the
first fails, the claim is released, so a retry runs afresh. Claims live in a KV bucket shared
by every gateway, for `ttl` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import streams
from schemas.answers import CachedAnswer
from schemas.errors import DeadlineExceededError, InvalidRequestError
from schemas.jetstream import open_bucket

RUNNING = b"R"
DONE = b"D"
POLL = 0.05
MAX_KEY_LENGTH = 255


class Idempotency:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, nc: NATS, js: JetStreamContext, *, replicas: int | None) -> Idempotency:
        return cls(await open_bucket(nc, js, streams.IDEMPOTENCY, replicas=replicas))

    @staticmethod
    def key_for(org: str, header: str) -> str:
        if not header or len(header) > MAX_KEY_LENGTH:
            raise InvalidRequestError(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.", param="Idempotency-Key"
            )
        return hashlib.sha256(f"{org}\0{header}".encode()).hexdigest()

    async def claim_or_wait(self, key: str, job_id: str, deadline: float) -> CachedAnswer | None:
        """None: this request owns the key and must run. Otherwise the first request's answer."""
        while time.time() < deadline:
            try:
                await self._kv.create(key, RUNNING + job_id.encode())
                return None
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.NotFoundError:
                continue  # released meanwhile: try to claim it
            if entry.value and entry.value.startswith(DONE):
                return CachedAnswer.decode(entry.value[1:])
            await asyncio.sleep(POLL)
        raise DeadlineExceededError("A request with the same Idempotency-Key is still running.")

    async def complete(self, key: str, answer: CachedAnswer) -> None:
        await self._kv.put(key, DONE + answer.encode())

    async def release(self, key: str) -> None:
        try:
            await self._kv.delete(key)
        except nats.errors.Error:
            pass  # the claim expires with the bucket's TTL
