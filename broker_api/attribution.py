"""Which node a usage record names, and at whose price: an attempt's claim checked against the
node registry.

Any node of a pool can write any node id into its events, so a node id alone proves nothing. An
enrolled node signs its claim (`schemas.events.claim_message`: job, attempt, its id) with the
seed of its own NATS credentials; the registry holds the public key issued at its join. A claim
naming an enrolled node counts only when it verifies against that key and the attempt ran in
that node's pool: the record names the node and the owner's price applies. Otherwise the record
names `UNVERIFIED` (no owner is credited), it costs nothing on an enrolled pool (as any unproven
work there), and the claim is audited once, under the claimed node's owner.

A node id the registry does not hold is an operator's worker (its identity is the operator's
role credentials, not an enrolment): its claim stands as it always did, at the worker's own
count of cost off enrolled pools, at no cost on them.
"""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing
import nkeys
import structlog

from broker_api.registry import NodeRegistry
from schemas.events import Claim
from schemas.registry import Price
from schemas.usage import AuditEvent

log = structlog.get_logger(__name__)

UNVERIFIED = "unverified"  # the node a usage record names when the claimed node did not prove it
FLAGGED_KEPT = 4096  # (job, attempt) pairs remembered so a claim is audited once, not per charge
KEYS_KEPT = 65536  # nodes' decoded public keys kept
VERDICTS_KEPT = 4096  # recent claims' checks kept: a request is charged up to three times (answer, store, record)


@dataclass(frozen=True, slots=True)
class Attribution:
    node: str  # the node the usage record names
    price: Price | None  # the registry's price; None: the worker's own count of cost stands
    flaw: str = ""  # why a claim naming an enrolled node was not believed ("" when it was, or names none)


def verify_key(public_key: str) -> nacl.signing.VerifyKey | None:
    """The ed25519 key of a user nkey's public key (`U...`), or None if it is not one."""
    try:
        raw = bytearray(base64.b32decode(public_key + "=" * (-len(public_key) % 8)))
    except (ValueError, TypeError):
        return None
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        return None
    if nkeys.crc16(raw[:-2]) != int.from_bytes(raw[-2:], "little"):
        return None
    return nacl.signing.VerifyKey(bytes(raw[1:-2]))


def verifies(key: nacl.signing.VerifyKey | None, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `message` signed by `key`'s seed."""
    if key is None:
        return False
    try:
        key.verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


class Attributor:
    def __init__(self, registry: NodeRegistry, audit: Callable[[AuditEvent], None]) -> None:
        self._registry = registry
        self._audit = audit
        self._flagged: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._keys: dict[str, nacl.signing.VerifyKey | None] = {}  # decoding a key costs as much as a check
        self._verdicts: OrderedDict[tuple[str, int, str, bytes, str], bool] = OrderedDict()

    def _key(self, public_key: str) -> nacl.signing.VerifyKey | None:
        if public_key not in self._keys:
            if len(self._keys) >= KEYS_KEPT:
                self._keys.clear()
            self._keys[public_key] = verify_key(public_key)
        return self._keys[public_key]

    def attribute(self, claim: Claim, pool: str) -> Attribution:
        """The node and price of an attempt that ran on `pool` and claimed `claim`."""
        registry = self._registry
        enrolled_pool = pool in registry.pools()
        record = registry.record(claim.node)
        if record is None:  # an operator's worker, or no claim at all
            return Attribution(claim.node, Price() if enrolled_pool else None)
        if record.removed:
            flaw = "the node was removed"
        elif record.pool != pool:
            flaw = "the attempt ran in another pool"
        elif not claim.proof:
            flaw = "no proof"
        elif not self._proven(claim, record.user_key):
            flaw = "the proof does not verify"
        else:
            return Attribution(record.id, record.price)
        self._flag(claim, pool, record.org, flaw)
        return Attribution(UNVERIFIED, Price() if enrolled_pool else None, flaw)

    def _proven(self, claim: Claim, public_key: str) -> bool:
        """Whether the claim's proof verifies against the node's key, checked once per claim."""
        memo = (claim.job_id, claim.attempt, claim.node, claim.proof, public_key)
        verdict = self._verdicts.get(memo)
        if verdict is None:
            verdict = self._verdicts[memo] = verifies(self._key(public_key), claim.message(), claim.proof)
            if len(self._verdicts) > VERDICTS_KEPT:
                self._verdicts.popitem(last=False)
        return verdict

    def _flag(self, claim: Claim, pool: str, org: str, flaw: str) -> None:
        key = (claim.job_id, claim.attempt)
        if key in self._flagged:
            return
        self._flagged[key] = None
        if len(self._flagged) > FLAGGED_KEPT:
            self._flagged.popitem(last=False)
        log.warning("nodes.unverified_claim", node=claim.node, job_id=claim.job_id, pool=pool, flaw=flaw)
        self._audit(
            AuditEvent(
                id=f"node.unverified.{claim.job_id}.{claim.attempt}",  # one per attempt, however many gateways
                time=time.time(),
                org=org,
                actor=UNVERIFIED,
                action="node.unverified",
                target=claim.node,
                source="",
                detail={"job_id": claim.job_id, "attempt": claim.attempt, "pool": pool, "flaw": flaw},
            )
        )
