"""API-key authentication.

Until the control plane lands, one bootstrap admin key: `TOKENYARD_ADMIN_KEY`, or a key
generated once into `<data dir>/admin_key` (mode 0600) and printed at start. Keys are compared
as SHA-256 digests with `hmac.compare_digest`; the key itself is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import AuthenticationError

KEY_PREFIX = "ty"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str
    admin: bool


def new_key(key_id: str) -> str:
    return f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def load_or_create_admin_key(data_dir: str, configured: str) -> tuple[str, bool]:
    """The admin key, and whether it was created just now (so it should be shown)."""
    if configured:
        return configured, False
    path = Path(data_dir) / "admin_key"
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key("admin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyStore:
    def __init__(self, admin_key: str) -> None:
        if not admin_key:
            raise ValueError("an admin key is required")
        self._admin = _digest(admin_key)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", code=None)
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError("The Authorization header must be 'Bearer YOUR_KEY'.", code=None)
        if hmac.compare_digest(_digest(key), self._admin):
            return Principal(tenant="default", key_id="admin", admin=True)
        shown = key[:6] + "*" * 4 + key[-4:] if len(key) > 12 else "*" * 8
        raise AuthenticationError(f"Incorrect API key provided: {shown}.")
