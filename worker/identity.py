"""The worker's proof of who it is: its attempts' claims signed with its NATS user key.

An enrolled node's `.creds` file holds its user seed (`SU...`); the gateway knows the matching
public key from the node registry, so a claim signed with it (`schemas.events.claim_message`)
proves the work was this node's and no other's. One ed25519 signature per attempt (tens of
microseconds), sent on the attempt's first event. A worker without credentials (an operator's,
on an unauthenticated NATS) signs nothing; its claims stand where no enrolment is at stake.
"""

from __future__ import annotations

import re
from pathlib import Path

import nkeys

from schemas.events import claim_message

_SEED = re.compile(rb"-----BEGIN USER NKEY SEED-----\s*(SU[A-Z2-7]+)\s*-+END USER NKEY SEED-+")


class Signer:
    def __init__(self, seed: bytes) -> None:
        """`seed`: a user nkey seed; b"": sign nothing."""
        self._key = nkeys.from_seed(bytearray(seed)) if seed else None

    @classmethod
    def from_creds(cls, path: str) -> Signer:
        """The signer of a `.creds` file's seed ("" or a file without one: sign nothing)."""
        if not path:
            return cls(b"")
        found = _SEED.search(Path(path).expanduser().read_bytes())
        return cls(found.group(1) if found else b"")

    def prove(self, job_id: str, attempt: int, node: str) -> bytes:
        """This attempt's proof, or b"" without a key."""
        if self._key is None:
            return b""
        return bytes(self._key.sign(claim_message(job_id, attempt, node)))
