"""The usage record: one per job, billed once; and a worker's report of a job whose gateway died.

Published to the `TY_USAGE` stream with the job id as message id, so a retried publish is a
duplicate; every ledger keeps one row per job id. Where its counts come from (`counted_by`):

- "gateway": the gateway that served the job counted them: the completion tokens it relayed
  to the client, and the prompt as the worker's final count reported it (checked against what
  was relayed, never a number a worker merely claims beyond it);
- "estimate": the gateway relayed the completion tokens but no final count came (the worker
  died): the prompt is the gateway's own estimate;
- "worker": the gateway is gone, so nothing could check the worker. A worker whose gateway
  stopped answering (its heartbeats find no responder, or go unanswered; or its final DONE
  does) publishes a `WorkerReport` of what it generated. It knows no tenant: the report is
  keyed by job id and carries the job's ticket, which the gateway sealed at admission (who
  asked, the key, the project, what admission reserved) and which only gateways can open.
  A gateway turns the report into the job's usage record (`broker_api.orphans`), after a grace
  period and only if no record of the job exists; JetStream's dedupe by message id and the
  ledgers' primary key keep one row per job even if the gateway's own record comes too.
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
CountedBy = Literal["gateway", "worker", "estimate"]
COUNTED_BY: frozenset[str] = frozenset({"gateway", "worker", "estimate"})


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
    counted_by: CountedBy = "gateway"  # where the counts come from (the module docstring)

    def encode(self) -> bytes:
        return _pack(self)

    @classmethod
    def decode(cls, data: bytes) -> UsageRecord:
        record = _unpack(cls, data)
        if record.outcome not in OUTCOMES:
            raise WireError(f"unknown outcome {record.outcome!r}")
        if record.counted_by not in COUNTED_BY:
            raise WireError(f"unknown counted_by {record.counted_by!r}")
        return record


@dataclass(frozen=True, slots=True)
class Ticket:
    """Who asked for a job, as the gateway sealed it into the job (`broker_api.tickets`): what a
    usage record needs that a worker must not learn, and the bounds its report is held to."""

    org: str
    project: str
    key_id: str
    model: str  # as the client asked for it
    arrived: float  # unix time the request arrived
    stream: bool
    reserved_tokens: int  # what admission reserved (0: the key and org are unlimited)
    prompt_estimate: int  # the gateway's estimate of the prompt
    max_completion: int  # the request's token limit; 0 = none

    def encode(self) -> bytes:
        return _pack(self)

    @classmethod
    def decode(cls, data: bytes) -> Ticket:
        return _unpack(cls, data)


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What one attempt generated, from the worker that ran it, when its gateway was gone.

    Untrusted: it becomes billing only through a gateway that opens `ticket` (sealed to this
    job id, so it cannot be moved to another job) and finds no record of the job, and then the
    record says `counted_by: "worker"`. A worker cannot read the ticket: no tenant identity.
    """

    job_id: str
    ticket: bytes  # sealed by the gateway at admission (`schemas.jobs.Job.ticket`)
    node: str
    pool: str
    model: str
    attempt: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: float | None  # USD at the route's prices (a cloud adapter's), None if unknown
    started: float  # unix time the attempt began
    time: float  # unix time of the report
    finished: bool  # the answer was complete (only its DONE went unheard)
    reason: str  # why the worker decided its gateway was gone
    proof: bytes = b""  # the node's signature of the attempt's claim (`schemas.events.Claim`); b"": none

    def encode(self) -> bytes:
        return _pack(self)

    @classmethod
    def decode(cls, data: bytes) -> WorkerReport:
        report = _unpack(cls, data)
        if not isinstance(report.ticket, bytes) or not isinstance(report.proof, bytes):
            raise WireError("a report's ticket and proof must be bytes")
        return report


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
