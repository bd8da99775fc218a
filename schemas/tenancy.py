"""Orgs, projects, API keys and their limits, as stored in NATS KV and carried to the scheduler.

An API key reads `ty_<key id>_<secret>`. Only a hash of the whole key is stored (`KeyRecord.digest`,
HMAC-SHA256 with the operator's pepper); the key id finds the record. Records are msgpack maps
read tolerantly, like every other message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.codec import WireError, need, pack, unpack

Tier = Literal["interactive", "standard", "batch"]
PRIORITY_TIERS: tuple[Tier, ...] = ("interactive", "standard", "batch")  # first is served first
DEFAULT_TIER: Tier = "standard"
ROOT_ORG = "default"  # the operator's own org: the bootstrap admin key's, and the fleet's events'


@dataclass(frozen=True, slots=True)
class Limits:
    """Zero means "no limit". Per key, or per org (the stricter of the two applies)."""

    rpm: int = 0  # requests per minute
    tpm: int = 0  # tokens (prompt + completion) per minute
    max_concurrent: int = 0  # requests in flight at once
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    usd_per_day: float = 0.0
    usd_per_month: float = 0.0
    max_tokens: int = 0  # the largest max_tokens a request may ask for
    max_body_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The limits set (flat values: read field by field, without `asdict`'s deep copy)."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name))}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Limits:
        if not d:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            values: dict[str, Any] = {
                k: (float(v) if k.startswith("usd") else int(v)) for k, v in d.items() if k in known
            }
        except (TypeError, ValueError) as e:
            raise WireError(f"bad limits: {e}") from e
        return cls(**values)

    @property
    def empty(self) -> bool:
        return self == NO_LIMITS  # (field by field, no copy: this is on the request path)


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    org: str
    name: str
    digest: str  # hex HMAC-SHA256 of the whole key
    created: float
    project: str = ""
    admin: bool = False
    models: tuple[str, ...] = ()  # allowed model ids; empty = all
    limits: Limits = field(default_factory=Limits)
    priority: Tier = DEFAULT_TIER
    expires: float = 0.0  # unix time; 0 = never
    revoked: float = 0.0  # unix time it was revoked; 0 = live
    cache: bool = True  # may this key's requests be answered from the response cache
    volunteer_ok: bool = False  # may its jobs run on idle-time (volunteer) nodes

    def usable(self, now: float) -> bool:
        return not self.revoked and (not self.expires or now < self.expires)

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the digest."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "digest"}
        d["limits"] = self.limits.to_dict()
        d["models"] = list(self.models)
        return d

    def encode(self) -> bytes:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["limits"] = self.limits.to_dict()
        d["models"] = list(self.models)
        return pack(d)

    @classmethod
    def decode(cls, data: bytes) -> KeyRecord:
        o = unpack(data)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in o.items() if k in names}
        values["limits"] = Limits.from_dict(values.get("limits"))
        values["models"] = tuple(values.get("models") or ())
        if values.get("priority", DEFAULT_TIER) not in PRIORITY_TIERS:
            raise WireError(f"unknown priority {values.get('priority')!r}")
        try:
            return cls(**values)
        except TypeError as e:
            raise WireError(f"bad key record: {e}") from e


@dataclass(frozen=True, slots=True)
class OrgRecord:
    id: str
    name: str
    created: float
    limits: Limits = field(default_factory=Limits)
    projects: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "created": self.created,
            "limits": self.limits.to_dict(),
            "projects": list(self.projects),
        }

    def encode(self) -> bytes:
        return pack(
            {
                "id": self.id,
                "name": self.name,
                "created": self.created,
                "limits": self.limits.to_dict(),
                "projects": list(self.projects),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> OrgRecord:
        o = unpack(data)
        try:
            return cls(
                id=str(need(o, "id")),
                name=str(o.get("name", "")),
                created=float(o.get("created", 0)),
                limits=Limits.from_dict(o.get("limits")),
                projects=tuple(str(p) for p in o.get("projects") or ()),
            )
        except (TypeError, ValueError) as e:
            raise WireError(f"bad org record: {e}") from e
