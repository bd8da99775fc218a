"""The response cache: identical deterministic requests are answered once.

Shared by every gateway replica through a JetStream-backed KV bucket with a TTL and a size cap
(oldest entries go first when it is full). The key is a SHA-256 of the canonical request (JSON
with sorted keys, without fields that do not change the answer: stream, stream_options, user,
metadata, usage) plus the model id. By default only deterministic requests are cached
(temperature 0, or a seed); keys may opt out (`KeyRecord.cache`), and a request may bypass it
with the header `x-tokenyard-cache: no`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import msgpack
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from schemas import subjects

log = structlog.get_logger(__name__)

IRRELEVANT = frozenset({"stream", "stream_options", "user", "metadata", "usage", "n"})


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    texts: list[str]
    finish: list[str]
    prompt_tokens: int
    completion_tokens: int
    cost: float

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": 1,
                "t": self.texts,
                "f": self.finish,
                "pt": self.prompt_tokens,
                "ct": self.completion_tokens,
                "c": self.cost,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> CachedAnswer:
        o = msgpack.unpackb(data, raw=False)
        return cls(list(o["t"]), list(o["f"]), int(o["pt"]), int(o["ct"]), float(o.get("c", 0.0)))


def cacheable(request: dict[str, Any]) -> bool:
    """Deterministic requests only: greedy decoding, or a fixed seed."""
    return request.get("temperature") == 0 or request.get("seed") is not None


def cache_key(request: dict[str, Any]) -> str:
    canonical = {k: v for k, v in request.items() if k not in IRRELEVANT}
    canonical["n"] = request.get("n") or 1
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, *, ttl: float, max_bytes: int, replicas: int = 1) -> ResponseCache:
        bucket = subjects.CACHE_BUCKET
        config = StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            max_msgs_per_subject=1,
            max_age=ttl,
            max_bytes=max_bytes,
            discard=DiscardPolicy.OLD,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            storage=StorageType.FILE,
            num_replicas=replicas,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
        return cls(await js.key_value(bucket))

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.NotFoundError:  # missing, deleted or expired
            return None
        except nats.errors.Error as e:
            log.warning("cache.get_failed", error=str(e))
            return None
        if entry.value is None:
            return None
        try:
            return CachedAnswer.decode(entry.value)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            return None

    async def put(self, key: str, answer: CachedAnswer) -> None:
        try:
            await self._kv.put(key, answer.encode())
        except nats.errors.Error as e:
            log.warning("cache.put_failed", error=str(e))
