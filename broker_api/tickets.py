"""Job tickets: who asked for a job, sealed into the job so that only gateways can read it.

A worker must never learn the tenant of a job it runs (volunteer nodes see prompts), yet when
the job's gateway dies mid-answer, the worker is the only one left who knows what ran. So the
gateway seals a `schemas.usage.Ticket` (org, project, key, model, arrival, what admission
reserved, the request's bounds) into the job envelope at admission, and a worker whose gateway
is gone sends it back with its counts (`schemas.usage.WorkerReport`); any gateway opens it and
writes the job's usage record (`broker_api.orphans`). Nothing is written anywhere per job: the
ticket travels inside the job message that is written anyway.

Sealing is AES-256-GCM with the job id as associated data: a worker can neither read a ticket
nor forge one, nor move one job's ticket onto another job's report. The key is 32 random bytes
in the `ty_secrets` bucket, which only the `api` role may read (`schemas.permissions`); the
first gateway to start creates it by compare-and-set, every other one reads the same key.

    ticket = KEY_ID (1 byte) | nonce (12 bytes) | AES-GCM(Ticket record, aad=job id)
"""

from __future__ import annotations

import os

import nats.js.errors
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js.kv import KeyValue

from broker_api.unavailable import retried
from schemas import subjects
from schemas.codec import WireError
from schemas.usage import Ticket

log = structlog.get_logger(__name__)

KEY_ID = b"\x01"  # the first key; a later rotation would add another id
NONCE_BYTES = 12


class Tickets:
    """Seals and opens tickets with the gateways' shared key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a ticket key is 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    async def open_shared(cls, kv: KeyValue) -> Tickets:
        """With the key of the secrets bucket, made by whichever gateway asks first. On a
        cluster that just formed (or lost a node) the bucket may have no leader yet: both steps
        ride that out (`unavailable.retried`) rather than failing the gateway's start."""

        async def make() -> None:
            try:
                await kv.create(subjects.TICKET_KEY, os.urandom(32))
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # another gateway made it first (or our first try did): read that one

        await retried(make, what="making the ticket key")
        entry = await retried(lambda: kv.get(subjects.TICKET_KEY), what="reading the ticket key")
        if entry.value is None:
            raise RuntimeError("the ticket key in the secrets bucket is empty")
        return cls(entry.value)

    def seal(self, job_id: str, ticket: Ticket) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return KEY_ID + nonce + self._aead.encrypt(nonce, ticket.encode(), job_id.encode())

    def open(self, job_id: str, sealed: bytes) -> Ticket | None:
        """The ticket, or None if it was not sealed by a gateway for this job."""
        if len(sealed) <= 1 + NONCE_BYTES or sealed[:1] != KEY_ID:
            return None
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            return Ticket.decode(self._aead.decrypt(nonce, body, job_id.encode()))
        except (InvalidTag, WireError):
            return None
