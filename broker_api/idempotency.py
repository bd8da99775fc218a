"""`Idempotency-Key`: the same key twice (per org) runs one job.

The first request with a key claims it atomically (`kv.create` fails if the key exists) and
runs; when it succeeds its answer is stored under the key, and any later request with the
same key gets that answer replayed (streamed or not, as it asks) without running anything or
being billed again. A request that arrives while the first still runs waits for it. If the
first fails, the claim is released, so a retry runs afresh. Claims live in a KV bucket shared
by every gateway, for `ttl` seconds.

A claim holds a digest of the request body (as validated, without `stream`: a stream and a
non-stream request ask the same thing). The same key with a different body is refused with
a 400 `idempotency_key_reused`: replaying the first answer to a different question would be
wrong, and silently. Entries written before digests were kept (`R`, `D`) match any body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import streams
from schemas.answers import CachedAnswer
from schemas.errors import DeadlineExceededError, InvalidRequestError
from schemas.jetstream import open_bucket

log = structlog.get_logger(__name__)

RUNNING = b"r"  # + body digest + job id
DONE = b"d"  # + body digest + the answer
LEGACY_RUNNING, LEGACY_DONE = b"R", b"D"  # without a digest
DIGEST_LENGTH = 32  # hex characters
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

    @staticmethod
    def body_digest(body: dict[str, Any]) -> bytes:
        """What a request asks, as a digest: the same for the same body however its keys are ordered."""
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH].encode()

    async def claim_or_wait(self, key: str, job_id: str, deadline: float, *, digest: bytes) -> CachedAnswer | None:
        """None: this request owns the key and must run. Otherwise the first request's answer.
        Raises InvalidRequestError when the key was used for a different body."""
        while time.time() < deadline:
            try:
                await self._kv.create(key, RUNNING + digest + job_id.encode())
                return None
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.NotFoundError:
                continue  # released meanwhile: try to claim it
            answer = _answer_of(entry.value or b"", digest)
            if answer is not None:
                return answer
            await asyncio.sleep(POLL)
        raise DeadlineExceededError("A request with the same Idempotency-Key is still running.")

    async def complete(self, key: str, answer: CachedAnswer, *, digest: bytes) -> None:
        """Store the answer for repeats. Called after the job ran, so a failure must not stop its
        accounting: it is logged, and the claim stays (a repeat waits, then times out, until the
        claim expires) rather than being released, which would run the job a second time. An
        answer larger than a NATS message (an embedding batch's vectors) can never be stored:
        its key is freed at once, so a repeat runs again instead of waiting out the claim."""
        try:
            await self._kv.put(key, DONE + digest + answer.encode())
        except nats.errors.MaxPayloadError:
            log.warning("idempotency.answer_too_large", size=len(answer.encode()))
            await self.release(key)
        except nats.errors.Error as e:
            log.error("idempotency.complete_failed", error=repr(e))

    async def release(self, key: str) -> None:
        try:
            await self._kv.delete(key)
        except nats.errors.Error:
            pass  # the claim expires with the bucket's TTL


def _answer_of(value: bytes, digest: bytes) -> CachedAnswer | None:
    """The stored answer (None while the first request still runs); refuses another body's key."""
    state, stored = value[:1], value[1 : 1 + DIGEST_LENGTH]
    if state in (RUNNING, DONE) and stored != digest:
        raise InvalidRequestError(
            "This Idempotency-Key was already used with a different request body; use a new key for a new request.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    if state == DONE:
        return CachedAnswer.decode(value[1 + DIGEST_LENGTH :])
    if state == LEGACY_DONE:
        return CachedAnswer.decode(value[1:])
    return None
