"""The node registry and enrolment tokens: NATS KV buckets, mirrored in memory by every gateway.

`ty_nodes` holds one `NodeRecord` per enrolled node (removed ones stay, marked, so their
credentials stay revoked); `ty_enrol` one `EnrolToken` per enrolment token, with only an HMAC
of its secret. A token's uses are spent by compare-and-set on its entry, so N gateways never
let a one-use token join twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from broker_api.directory import Mirror
from broker_api.unavailable import retried
from schemas import streams
from schemas.errors import AuthenticationError, ContentionError, UnavailableError
from schemas.jetstream import open_bucket
from schemas.registry import NODE_PREFIX, TOKEN_PREFIX, EnrolToken, NodeRecord, parse_token

SPEND_TRIES = 8
CATCH_UP = 5.0  # seconds the mirror may take to bring in changes already made
INVALID_TOKEN = "This enrolment token is not valid."


class NodeRegistry:
    def __init__(self, nodes: KeyValue, tokens: KeyValue, js: JetStreamContext, *, pepper: bytes) -> None:
        self._nodes = Mirror(nodes, js, streams.NODES, NodeRecord.decode)
        self._tokens = Mirror(tokens, js, streams.ENROL, EnrolToken.decode)
        self._pepper = pepper

    @classmethod
    async def open(cls, nc: NATS, js: JetStreamContext, *, pepper: bytes, replicas: int | None) -> NodeRegistry:
        nodes = await open_bucket(nc, js, streams.NODES, replicas=replicas)
        registry = cls(nodes, await open_bucket(nc, js, streams.ENROL, replicas=replicas), js, pepper=pepper)
        await registry._nodes.start()
        await registry._tokens.start()
        return registry

    async def close(self) -> None:
        await self._nodes.stop()
        await self._tokens.stop()

    def _digest(self, token: str) -> str:
        return hmac.new(self._pepper, token.encode("utf-8"), hashlib.sha256).hexdigest()

    # --- nodes --------------------------------------------------------------------------

    def node(self, node_id: str) -> NodeRecord | None:
        """A node that has not been removed."""
        record: NodeRecord | None = self._nodes.items.get(node_id)
        return record if record is not None and not record.removed else None

    def record(self, node_id: str) -> NodeRecord | None:
        """A node's record, removed or not (a removed node's id still names an enrolment)."""
        found: NodeRecord | None = self._nodes.items.get(node_id)
        return found

    def nodes(self, org: str | None) -> list[NodeRecord]:
        live = (n for n in self._nodes.items.values() if not n.removed and (org is None or n.org == org))
        return sorted(live, key=lambda n: n.created)

    def pools(self) -> set[str]:
        """Pools some enrolled (not removed) node serves."""
        return {n.pool for n in self._nodes.items.values() if not n.removed}

    def revocations(self) -> dict[str, int]:
        """Every disabled or removed node's NATS user, with the time its credentials stopped."""
        return {n.user_key: int(n.changed or n.created) for n in self._nodes.items.values() if n.revoked}

    async def current_revocations(self) -> dict[str, int]:
        """`revocations` once the mirror holds every change made so far, on any gateway.
        Raises UnavailableError when it cannot catch up."""
        if not await self._nodes.catch_up(CATCH_UP):
            raise UnavailableError("The node registry is behind; try again.")
        return self.revocations()

    async def put_node(self, record: NodeRecord) -> None:
        await retried(lambda: self._nodes.kv.put(record.id, record.encode()), what="the node change")
        self._nodes.items[record.id] = record

    @staticmethod
    def new_node_id() -> str:
        return NODE_PREFIX + secrets.token_hex(6)

    # --- enrolment tokens ---------------------------------------------------------------

    async def create_token(self, template: EnrolToken) -> tuple[str, EnrolToken]:
        """Store a token built from `template`; returns its secret, shown once."""
        token_id = secrets.token_hex(6)
        secret = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
        token = dataclasses.replace(template, id=token_id, digest=self._digest(secret), created=time.time())
        await self._tokens.kv.put(token.id, token.encode())
        self._tokens.items[token.id] = token
        return secret, token

    def tokens(self, org: str | None) -> list[EnrolToken]:
        found = (t for t in self._tokens.items.values() if org is None or t.org == org)
        return sorted(found, key=lambda t: t.created)

    def verify(self, token: str) -> EnrolToken | None:
        """The record of a presented token, if we issued it (usable or not)."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        record: EnrolToken | None = self._tokens.items.get(parsed[0])
        if record is None or not hmac.compare_digest(record.digest, self._digest(token)):
            return None
        return record

    async def spend(self, token: EnrolToken) -> EnrolToken:
        """Use one of the token's joins (compare-and-set: concurrent joins on any gateway spend
        each use once). Raises AuthenticationError (401) once it is expired or used up."""
        kv = self._tokens.kv
        for _ in range(SPEND_TRIES):
            try:
                entry = await kv.get(token.id)
            except nats.js.errors.KeyNotFoundError as e:
                raise AuthenticationError(INVALID_TOKEN, code="invalid_token") from e
            current = EnrolToken.decode(entry.value or b"")
            code, why = current.unusable(time.time())
            if code:
                raise AuthenticationError(why, code=code)
            spent = dataclasses.replace(current, used=current.used + 1)
            try:
                await kv.update(token.id, spent.encode(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            self._tokens.items[token.id] = spent
            return spent
        raise ContentionError("The enrolment token is being used concurrently; try again.")
