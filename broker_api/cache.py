"""The response cache: identical deterministic requests are answered once.

Shared by every gateway replica through a JetStream-backed KV bucket with a TTL and a size cap
(oldest entries go first when it is full). The key is a SHA-256 of the canonical request (JSON
with sorted keys, without fields that do not change the answer: stream, stream_options, user,
metadata, usage) plus the model id. By default only deterministic requests are cached
(temperature 0, or a seed); keys may opt out (`KeyRecord.cache`), and a request may bypass it
with the header `x-tokenyard-cache: no`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import streams
from schemas.answers import CachedAnswer
from schemas.codec import WireError
from schemas.jetstream import JetStreamError, JetStreamUnavailableError, open_bucket

log = structlog.get_logger(__name__)

TIMEOUT = 1.0  # seconds a look-up or a store may take before it counts as a miss
OPEN_PATIENCE = 10.0  # seconds to wait for the bucket at start before serving without it
IRRELEVANT = frozenset({"stream", "stream_options", "user", "metadata", "usage", "n"})


def cacheable(request: dict[str, Any]) -> bool:
    """Deterministic requests only: greedy decoding, or a fixed seed."""
    return request.get("temperature") == 0 or request.get("seed") is not None


def cache_key(request: dict[str, Any]) -> str:
    canonical = {k: v for k, v in request.items() if k not in IRRELEVANT}
    canonical["n"] = request.get("n") or 1
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Never fails a request: an error or a slow answer from the bucket is a miss (its one
    replica may be on a node that is down: see `schemas.streams.CACHE`)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(
        cls, nc: NATS, js: JetStreamContext, *, ttl: float, max_bytes: int, replicas: int | None
    ) -> ResponseCache | None:
        """The cache, or None (logged) if its bucket cannot be made now: the gateway serves
        without a cache rather than not at all."""
        spec = dataclasses.replace(streams.CACHE, ttl=ttl, max_bytes=max_bytes)
        try:
            return cls(await open_bucket(nc, js, spec, replicas=replicas, patience=OPEN_PATIENCE))
        except (nats.errors.Error, JetStreamError, JetStreamUnavailableError) as e:
            log.warning("cache.unavailable", error=repr(e))
            return None

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            entry = await asyncio.wait_for(self._kv.get(key), TIMEOUT)
        except nats.js.errors.NotFoundError:  # missing, deleted or expired
            return None
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            log.warning("cache.get_failed", error=repr(e))
            return None
        if entry.value is None:
            return None
        try:
            return CachedAnswer.decode(entry.value)
        except WireError as e:  # unreadable (another version wrote it): answer afresh
            log.warning("cache.bad_entry", error=str(e))
            return None

    async def put(self, key: str, answer: CachedAnswer) -> None:
        try:
            await asyncio.wait_for(self._kv.put(key, answer.encode()), TIMEOUT)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            log.warning("cache.put_failed", error=repr(e))
