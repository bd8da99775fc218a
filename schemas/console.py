"""The web console's session record, as every gateway keeps it in the sessions bucket
(`schemas.streams.SESSIONS`), under the SHA-256 of the session id (the id itself is only in
the browser's cookie, so reading the bucket does not let anyone take a session over).

A session names the API key that signed in, never the key itself: `fingerprint` is a digest
prefix of that key's current secret, so rotating or replacing the key ends its sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.codec import WireError, pack_fields, unpack_fields


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    key_id: str
    fingerprint: str  # of the key's secret at sign-in (broker_api.auth.KeyStore.resolve)
    csrf: str  # the synchronizer token every state-changing request must carry in a header
    created: float  # unix time of the sign-in
    seen: float  # unix time the record was last written (a session in use is rewritten)

    def encode(self) -> bytes:
        return pack_fields(self)

    @classmethod
    def decode(cls, data: bytes) -> ConsoleSession:
        record = unpack_fields(cls, data)
        texts = (record.key_id, record.fingerprint, record.csrf)
        if not all(isinstance(t, str) and t for t in texts):
            raise WireError("bad console session: key_id, fingerprint and csrf must be non-empty strings")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (record.created, record.seen)):
            raise WireError("bad console session: created and seen must be numbers")
        return record
