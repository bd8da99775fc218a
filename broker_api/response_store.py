"""Stored Responses API answers, per org and project, in the responses bucket (`schemas.streams.RESPONSES`,
shared by every gateway): what `previous_response_id` continues from and `GET` / `DELETE
/v1/responses/{id}` read. Entries expire with the bucket's TTL (`--responses-ttl`).

An entry's key is a digest of the org and the project and the response id, so one org (or one
project, as OpenAI scopes stored responses) can never read, continue or delete another's (its
ids simply are not there: 404). Ids are ours (`resp_` and 32 hex digits);
anything else is not looked up at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import streams
from schemas.codec import WireError
from schemas.jetstream import open_bucket
from schemas.responses import StoredResponse

log = structlog.get_logger(__name__)

ID_RE = re.compile(r"^resp_[0-9a-f]{32}$")


class ResponseStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, nc: NATS, js: JetStreamContext, *, ttl: float, replicas: int | None) -> ResponseStore:
        spec = dataclasses.replace(streams.RESPONSES, ttl=ttl)
        return cls(await open_bucket(nc, js, spec, replicas=replicas))

    @staticmethod
    def _key(org: str, project: str, response_id: str) -> str:
        scope = hashlib.sha256(f"{org}\0{project}".encode()).hexdigest()[:32]
        return f"{scope}.{response_id}"

    async def get(self, org: str, project: str, response_id: str) -> StoredResponse | None:
        if not ID_RE.match(response_id):
            return None
        try:
            entry = await self._kv.get(self._key(org, project, response_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        try:
            return StoredResponse.decode(entry.value)
        except WireError as e:
            log.warning("responses.unreadable", response_id=response_id, error=str(e))
            return None

    async def put(self, org: str, project: str, response_id: str, stored: StoredResponse) -> bool:
        """Store it; False (logged) if it cannot be kept, e.g. larger than a message may be."""
        try:
            await self._kv.put(self._key(org, project, response_id), stored.encode())
            return True
        except (nats.errors.Error, WireError) as e:
            log.warning("responses.store_failed", response_id=response_id, error=type(e).__name__)
            return False

    async def delete(self, org: str, project: str, response_id: str) -> bool:
        if await self.get(org, project, response_id) is None:
            return False
        await self._kv.purge(self._key(org, project, response_id))
        return True
