"""Enrolled nodes: the registry's records, enrolment tokens, and the rules every role applies.

A node joins with an enrolment token an admin made (`EnrolToken`: its pool, kind, allowed
models, expiry and uses; only an HMAC of its secret is stored). Joining makes a `NodeRecord`
in the node registry bucket (node id -> record), which is the operator-trusted truth about a
node: whose it is, what it may serve, whether it is enabled, and the price its owner set. What a
node says about itself in its adverts is checked against it (`admit_advert`): a node may serve
only its enrolled pool, kind and models, and its price is the registry's, never its own.

An enrolment token reads `tyj_<id>_<secret>`; a node id `nd-<hex>`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.codec import WireError, need, pack, unpack
from schemas.jobs import NodeAdvert

EnrolledKind = Literal["own", "volunteer"]
ENROLLED_KINDS: tuple[EnrolledKind, ...] = ("own", "volunteer")
NodeState = Literal["online", "stale", "offline", "draining", "disabled"]
TOKEN_PREFIX = "tyj"
NODE_PREFIX = "nd-"
STALE_AFTER = 3  # adverts missed before a node counts as stale (the fleet's own rule)
OFFLINE_AFTER = 30.0  # seconds of silence after which a stale node counts as offline


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens an owner charges for its node's capacity (0: free)."""

    input: float = 0.0
    output: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"input": self.input, "output": self.output}

    @classmethod
    def from_dict(cls, d: Any) -> Price:
        if not d:
            return cls()
        try:
            return cls(input=float(d.get("input", 0.0)), output=float(d.get("output", 0.0)))
        except (AttributeError, TypeError, ValueError) as e:
            raise WireError(f"bad price: {e}") from e

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: str
    org: str  # the owner: the org whose admin made the enrolment token
    pool: str
    kind: EnrolledKind
    models: tuple[str, ...]  # what it may serve
    created: float
    user_key: str  # public nkey of its NATS credentials (revoked when disabled or removed)
    token: str = ""  # id of the enrolment token it joined with
    name: str = ""  # the hostname it gave when joining
    enabled: bool = True
    changed: float = 0.0  # unix time `enabled` last changed (the revocation's time when disabled)
    removed: float = 0.0  # unix time it was removed (kept so its credentials stay revoked)
    price: Price = field(default_factory=Price)

    @property
    def revoked(self) -> bool:
        return self.removed > 0 or not self.enabled

    def encode(self) -> bytes:
        o = dataclasses.asdict(self)
        o["models"], o["price"] = list(self.models), self.price.to_dict()
        return pack(o)

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        o = unpack(data)
        try:
            return cls(
                id=str(need(o, "id")),
                org=str(need(o, "org")),
                pool=str(need(o, "pool")),
                kind=_kind(need(o, "kind")),
                models=tuple(str(m) for m in o.get("models", ())),
                created=float(o.get("created", 0.0)),
                user_key=str(o.get("user_key", "")),
                token=str(o.get("token", "")),
                name=str(o.get("name", "")),
                enabled=bool(o.get("enabled", True)),
                changed=float(o.get("changed", 0.0)),
                removed=float(o.get("removed", 0.0)),
                price=Price.from_dict(o.get("price")),
            )
        except (TypeError, ValueError) as e:
            raise WireError(f"bad node record: {e}") from e

    def replace(self, **changes: Any) -> NodeRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class EnrolToken:
    id: str
    digest: str  # hex HMAC-SHA256 of the whole token
    org: str
    pool: str
    kind: EnrolledKind
    models: tuple[str, ...]  # empty: whatever the node serves when it joins
    created: float
    expires: float  # unix time
    uses: int  # joins it allows in all
    used: int = 0
    creator: str = ""  # the admin key that made it

    def unusable(self, now: float) -> tuple[str, str]:
        """(code, message) saying why it cannot be used now; ("", "") when it can."""
        if now >= self.expires:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires))
            return "token_expired", f"This enrolment token expired at {when}; ask an admin for a new one."
        if self.used >= self.uses:
            return "token_used_up", (
                f"This enrolment token has been used up ({self.used} of {self.uses} joins); ask an admin for a new one."
            )
        return "", ""

    def encode(self) -> bytes:
        o = dataclasses.asdict(self)
        o["models"] = list(self.models)
        return pack(o)

    @classmethod
    def decode(cls, data: bytes) -> EnrolToken:
        o = unpack(data)
        try:
            return cls(
                id=str(need(o, "id")),
                digest=str(need(o, "digest")),
                org=str(need(o, "org")),
                pool=str(need(o, "pool")),
                kind=_kind(need(o, "kind")),
                models=tuple(str(m) for m in o.get("models", ())),
                created=float(o.get("created", 0.0)),
                expires=float(need(o, "expires")),
                uses=int(need(o, "uses")),
                used=int(o.get("used", 0)),
                creator=str(o.get("creator", "")),
            )
        except (TypeError, ValueError) as e:
            raise WireError(f"bad enrolment token: {e}") from e

    def public(self) -> dict[str, Any]:
        return {
            "object": "node.token",
            "id": self.id,
            "org": self.org,
            "pool": self.pool,
            "kind": self.kind,
            "models": list(self.models),
            "created": int(self.created),
            "expires": int(self.expires),
            "uses": self.uses,
            "used": self.used,
        }


def parse_token(token: str) -> tuple[str, str] | None:
    """(`id`, `secret`) of a `tyj_<id>_<secret>` token, or None."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not token_id or not secret:
        return None
    return token_id, secret


def allowed_models(token_models: tuple[str, ...], asked: tuple[str, ...]) -> tuple[str, ...]:
    """What a joining node may serve: what it asked for within what its token allows (all it
    asked for, when the token names none; all the token names, when it asked for none)."""
    if not token_models:
        return asked
    if not asked:
        return token_models
    return tuple(m for m in asked if m in token_models)


def admit_advert(advert: NodeAdvert, record: NodeRecord | None) -> NodeAdvert | None:
    """The advert as the scheduler may use it, or None to ignore it.

    A node with no record is the operator's own (its identity can only advertise under its own
    id when NATS authentication is on; see schemas.permissions). An enrolled node's advert must
    keep to its enrolment: its pool and kind, only its models (others dropped), only while
    enabled; and its prices are the registry's, whatever the node claims."""
    if record is None:
        return advert
    if record.revoked or advert.pool != record.pool or advert.kind != record.kind:
        return None
    price = record.price
    models = tuple(
        dataclasses.replace(m, input_price=price.input, output_price=price.output)
        for m in advert.models
        if m.id in record.models
    )
    if not models:
        return None
    return dataclasses.replace(advert, models=models)


def node_state(record: NodeRecord, advert: NodeAdvert | None, silent_for: float) -> NodeState:
    """What `tokenyard nodes list` shows: disabled by its owner, else what its adverts say."""
    if not record.enabled:
        return "disabled"
    if advert is None or silent_for > OFFLINE_AFTER:
        return "offline"
    if silent_for > STALE_AFTER * max(advert.interval, 0.05):
        return "stale"
    return "draining" if advert.draining else "online"


def _kind(value: Any) -> EnrolledKind:
    if value not in ENROLLED_KINDS:
        raise WireError(f"unknown enrolled kind {value!r}")
    return value  # type: ignore[no-any-return]
