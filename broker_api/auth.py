"""API-key authentication.

Two kinds of key: the bootstrap admin key (`TOKENYARD_ADMIN_KEY`, or generated once into
`<data dir>/admin_key` and printed at start), which administers every org; and keys issued
through the admin API (`broker_api.directory`), each belonging to one org. Keys are compared
as digests with `hmac.compare_digest`; a key itself is never logged or echoed back whole.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker_api.directory import ROOT_ORG, Directory
from schemas.errors import AuthenticationError, ModelNotFoundError, PermissionDeniedError
from schemas.tenancy import DEFAULT_TIER, KeyRecord, Limits, Tier

BOOTSTRAP_ID = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    org: str
    key_id: str
    admin: bool  # may use the admin API (for its own org)
    root: bool = False  # the bootstrap key: every org
    project: str = ""
    priority: Tier = DEFAULT_TIER
    key_limits: Limits = field(default_factory=Limits)
    org_limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()
    cache: bool = True
    volunteer_ok: bool = False

    def check_model(self, model: str) -> None:
        if self.models and model not in self.models:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist or you do not have access to it.", param="model"
            )

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDeniedError("This key may not use the admin API.")

    def scope(self, org: str | None) -> str | None:
        """The org an admin request may see: its own, or any (None = all) for the root key."""
        if self.root:
            return org
        return self.org


def load_or_create_admin_key(data_dir: str, configured: str) -> tuple[str, bool]:
    """The admin key, and whether it was created just now (so it should be shown)."""
    if configured:
        return configured, False
    path = Path(data_dir) / "admin_key"
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"ty_{BOOTSTRAP_ID}_{secrets.token_urlsafe(32)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True


def _masked(key: str) -> str:
    return key[:6] + "****" + key[-4:] if len(key) > 12 else "********"


class KeyStore:
    """Tells who a request's `Authorization` header belongs to: the bootstrap admin key, or a
    key issued through the admin API (looked up in the directory's in-memory mirror)."""

    def __init__(self, admin_key: str, directory: Directory) -> None:
        if not admin_key:
            raise ValueError("an admin key is required")
        self._admin = hashlib.sha256(admin_key.encode("utf-8")).digest()
        self._directory = directory

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code=None,
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError("The Authorization header must be 'Bearer YOUR_KEY'.", code=None)
        if hmac.compare_digest(hashlib.sha256(key.encode("utf-8")).digest(), self._admin):
            return Principal(org=ROOT_ORG, key_id=BOOTSTRAP_ID, admin=True, root=True)
        record = self._directory.verify(key)
        if record is None or not record.usable(time.time()):
            raise AuthenticationError(f"Incorrect API key provided: {_masked(key)}.")
        return self._principal(record)

    def resolve(self, key_id: str) -> tuple[Principal, str] | None:
        """The principal of the key with this id as it is now, and a fingerprint of its current
        secret (it changes when the key is rotated); None if the key is gone, revoked or expired.
        How a console session, which holds a key id and never the key, is checked on each use."""
        if key_id == BOOTSTRAP_ID:
            return Principal(org=ROOT_ORG, key_id=BOOTSTRAP_ID, admin=True, root=True), self._admin.hex()[:16]
        record = self._directory.key(key_id)
        if record is None or not record.usable(time.time()):
            return None
        return self._principal(record), record.digest[:16]

    def _principal(self, record: KeyRecord) -> Principal:
        org = self._directory.org(record.org)
        return Principal(
            org=record.org,
            key_id=record.id,
            admin=record.admin,
            project=record.project,
            priority=record.priority,
            key_limits=record.limits,
            org_limits=org.limits if org else Limits(),
            models=record.models,
            cache=record.cache,
            volunteer_ok=record.volunteer_ok,
        )
