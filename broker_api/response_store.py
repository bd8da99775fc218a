"""Stored Responses API answers, per org and project, in the responses bucket (`schemas.streams.RESPONSES`,
shared by every gateway): what `previous_response_id` continues from and `GET` / `DELETE
/v1/responses/{id}` read. Entries expire with the bucket's TTL (`--responses-ttl`).

An entry's key is a digest of the org and the project and the response id, so one org (or one
project, as OpenAI scopes stored responses) can never read, continue or delete another's (its
ids simply are not there: 404). Ids are ours (`resp_` and 32 hex digits);
anything else is not looked up at all.

A stored response that fits one NATS message (`max_payload`, 1 MiB by default) is one entry.
A larger one (a long conversation, a long answer) is kept in parts of `PART_BYTES` under
`<key>.<n>` in the same bucket, written before its head (`schemas.responses.StoredParts`,
under the key), so a reader that finds the head finds every part; the head names the size and
SHA-256 of the whole, and a part that is gone or does not match makes the response unreadable
(404), never a wrong one. Both paths live in one bucket, so its TTL and byte limit cover them
alike, and a delete purges the head and then its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import streams
from schemas.codec import WireError
from schemas.jetstream import open_bucket
from schemas.responses import MAX_PARTS, StoredParts, StoredResponse, decode_stored

log = structlog.get_logger(__name__)

ID_RE = re.compile(r"^resp_[0-9a-f]{32}$")
PART_BYTES = 512 * 1024  # one part: half of NATS's default max_payload
HEADROOM = 4096  # what a message carries besides its value (subject, headers), against max_payload
PARALLEL = 8  # parts written or read at once

A = TypeVar("A")
T = TypeVar("T")


class ResponseStore:
    def __init__(self, kv: KeyValue, *, max_payload: Callable[[], int]) -> None:
        self._kv = kv
        self._max_payload = max_payload  # the connected server's; read per write (a reconnect may change it)

    @classmethod
    async def open(cls, nc: NATS, js: JetStreamContext, *, ttl: float, replicas: int | None) -> ResponseStore:
        spec = dataclasses.replace(streams.RESPONSES, ttl=ttl)
        return cls(await open_bucket(nc, js, spec, replicas=replicas), max_payload=lambda: nc.max_payload)

    @staticmethod
    def _key(org: str, project: str, response_id: str) -> str:
        scope = hashlib.sha256(f"{org}\0{project}".encode()).hexdigest()[:32]
        return f"{scope}.{response_id}"

    async def _value(self, key: str) -> bytes | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value

    async def _head(self, key: str, response_id: str) -> StoredResponse | StoredParts | None:
        data = await self._value(key)
        if data is None:
            return None
        try:
            return decode_stored(data)
        except WireError as e:
            log.warning("responses.unreadable", response_id=response_id, error=str(e))
            return None

    async def get(self, org: str, project: str, response_id: str) -> StoredResponse | None:
        if not ID_RE.match(response_id):
            return None
        key = self._key(org, project, response_id)
        head = await self._head(key, response_id)
        if not isinstance(head, StoredParts):
            return head
        pieces = await _bounded(self._value, [f"{key}.{n}" for n in range(head.parts)])
        data = b"".join(p for p in pieces if p is not None)
        if None in pieces or len(data) != head.size or hashlib.sha256(data).hexdigest() != head.digest:
            log.warning("responses.parts_unreadable", response_id=response_id, parts=head.parts)
            return None
        try:
            return StoredResponse.decode(data)
        except WireError as e:
            log.warning("responses.unreadable", response_id=response_id, error=str(e))
            return None

    async def put(self, org: str, project: str, response_id: str, stored: StoredResponse) -> bool:
        """Store it, in parts if it is larger than a message may be; False (logged) if it cannot
        be kept (the bucket is full, NATS did not answer)."""
        key = self._key(org, project, response_id)
        try:
            data = stored.encode()
        except WireError as e:
            log.warning("responses.store_failed", response_id=response_id, error=str(e))
            return False
        one = self._max_payload() - HEADROOM
        try:
            if len(data) <= one:
                await self._kv.put(key, data)
            else:
                await self._put_parts(key, data, min(PART_BYTES, one))
            return True
        except (nats.errors.Error, WireError) as e:
            log.warning("responses.store_failed", response_id=response_id, size=len(data), error=type(e).__name__)
            return False

    async def _put_parts(self, key: str, data: bytes, size: int) -> None:
        parts = [data[i : i + size] for i in range(0, len(data), size)]
        if len(parts) > MAX_PARTS:
            raise WireError(f"{len(data)} bytes are more than {MAX_PARTS} parts of {size}")
        try:
            await _bounded(self._put_part, [(f"{key}.{n}", p) for n, p in enumerate(parts)])
            await self._kv.put(key, StoredParts(len(parts), len(data), hashlib.sha256(data).hexdigest()).encode())
        except BaseException:
            # NATS failed, or the request was cancelled (its client left) while the parts were
            # written: no head names them, so do not keep them until the TTL. Shielded, so a
            # cancellation does not cut the purge itself short.
            await asyncio.shield(self._purge_parts(key, len(parts)))
            raise

    async def _put_part(self, part: tuple[str, bytes]) -> None:
        await self._kv.put(*part)

    async def _purge(self, key: str) -> None:
        with contextlib.suppress(nats.errors.Error):  # a part left behind still goes with the TTL
            await self._kv.purge(key)

    async def _purge_parts(self, key: str, parts: int) -> None:
        await _bounded(self._purge, [f"{key}.{n}" for n in range(parts)])

    async def delete(self, org: str, project: str, response_id: str) -> bool:
        if not ID_RE.match(response_id):
            return False
        key = self._key(org, project, response_id)
        head = await self._head(key, response_id)
        if head is None:
            return False
        await self._kv.purge(key)  # the head first: from now on nobody reads the parts
        if isinstance(head, StoredParts):
            await self._purge_parts(key, head.parts)
        return True


async def _bounded(call: Callable[[A], Awaitable[T]], args: Sequence[A]) -> list[T]:
    """`call` on each of `args`, at most `PARALLEL` at a time; the results in order. A call that
    raises ends it, but only once the others of its batch are done (none is left running: a
    part written after its purge would stay until the TTL)."""
    out: list[T] = []
    for i in range(0, len(args), PARALLEL):
        batch = await asyncio.gather(*(call(a) for a in args[i : i + PARALLEL]), return_exceptions=True)
        for result in batch:
            if isinstance(result, BaseException):
                raise result
            out.append(result)
    return out
