"""The usage record: one per job, published by the gateway that served it, billed once.

Published to the `TY_USAGE` stream with the job id as message id, so a retried publish is a
duplicate; every ledger keeps one row per job id. Token counts are the gateway's: completion
tokens it relayed to the client (never a number a worker merely claims).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from schemas.codec import WireError
from schemas.codec import pack_fields as _pack
from schemas.codec import unpack_fields as _unpack

Outcome = Literal["ok", "error", "cancelled", "cached"]
OUTCOMES: frozenset[str] = frozenset({"ok", "error", "cancelled", "cached"})


@dataclass(frozen=True, slots=True)
class UsageRecord:
    job_id: str
    time: float  # unix time the request arrived
    org: str
    project: str
    key_id: str
    model: str
    route: str  # the pool (provider or own nodes) that served it; "cache" for cache hits
    node: str  # the node of the winning attempt
    attempts: int  # dispatches it took
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: float  # USD
    ttft_ms: float  # time to first token as the client saw it; 0 if none
    duration_ms: float
    outcome: Outcome
    status: int = 200  # the HTTP status (or the error's) the client got
    stream: bool = False
    reserved_tokens: int = 0  # what admission reserved, so limits can settle exactly

    def encode(self) -> bytes:
        return _pack(self)

    @classmethod
    def decode(cls, data: bytes) -> UsageRecord:
        record = _unpack(cls, data)
        if record.outcome not in OUTCOMES:
            raise WireError(f"unknown outcome {record.outcome!r}")
        return record


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Who did what, when, from where. Append-only; published to `TY_AUDIT` by id."""

    id: str
    time: float
    org: str
    actor: str  # the key id that acted ("admin" for the bootstrap key)
    action: str  # e.g. "key.create", "key.revoke", "org.create", "org.update", "admin.signin"
    target: str  # the id acted on
    source: str  # the client's address
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        return _pack(self)

    @classmethod
    def decode(cls, data: bytes) -> AuditEvent:
        return _unpack(cls, data)
