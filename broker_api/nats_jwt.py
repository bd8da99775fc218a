"""NATS decentralized-auth documents: nkeys, JWT claims and `.creds` files, in NATS's own format.

A NATS deployment in operator mode trusts one *operator* key; the operator signs *account*
JWTs (an account is a namespace with its own streams and limits), and an account key signs
*user* JWTs (one identity with its publish/subscribe permissions). A client proves it holds the
user's seed by signing the server's nonce (nats-py does, given a `.creds` file).

This module only encodes: keys are nkeys (ed25519, `nkeys` package), a JWT is
`base64url(header).base64url(claims).base64url(ed25519 signature)` with header
`{"typ":"JWT","alg":"ed25519-nkey"}` and a `jti` that is the base32 SHA-512/256 of the claims,
as nats-io/jwt (v2) writes them. We write the few claims Tokenyard needs rather than depend on
the `nats-jwt` package, which pins old versions of pytz and pulls pycryptodome, dacite and
dataclasses-json for the same four small JSON documents.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import nkeys

from schemas.permissions import Permissions

OPERATOR = nkeys.PREFIX_BYTE_OPERATOR
ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT
USER = nkeys.PREFIX_BYTE_USER
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
UNLIMITED = -1


def new_seed(prefix: int) -> bytes:
    """A fresh nkey seed (`SO...`, `SA...`, `SU...`) for an operator, account or user."""
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


@dataclass(frozen=True, slots=True)
class Key:
    """One nkey: its seed (secret) and public key (`O...`, `A...`, `U...`)."""

    seed: bytes

    @property
    def public(self) -> str:
        return bytes(nkeys.from_seed(bytearray(self.seed)).public_key).decode()

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(bytearray(self.seed)).sign(data))

    @classmethod
    def new(cls, prefix: int) -> Key:
        return cls(new_seed(prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode(claims: dict[str, Any], signer: Key) -> str:
    """A signed JWT of `claims` (which must not hold `jti`, `iat` or `iss`: set here)."""
    body = {**claims, "iat": int(claims.get("iat") or time.time()), "iss": signer.public, "jti": ""}
    body.pop("jti")
    digest = hashlib.new("sha512_256", json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(signature)}"


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (for reading back what we wrote)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def operator_jwt(operator: Key, *, name: str, system_account: str) -> str:
    nats = {"type": "operator", "version": 2, "system_account": system_account}
    return encode({"name": name, "sub": operator.public, "nats": nats}, operator)


def account_jwt(
    operator: Key,
    account: str,
    *,
    name: str,
    jetstream: bool,
    revocations: dict[str, int] | None = None,
    issued_at: int = 0,
) -> str:
    """An account's JWT. `revocations` (user public key -> unix time) invalidates every user JWT
    of that key issued at or before that time; the server closes such users' connections as
    soon as it receives the updated account JWT."""
    limits: dict[str, Any] = {
        "subs": UNLIMITED,
        "data": UNLIMITED,
        "payload": UNLIMITED,
        "imports": UNLIMITED,
        "exports": UNLIMITED,
        "wildcards": True,
        "conn": UNLIMITED,
        "leaf": UNLIMITED,
    }
    if jetstream:
        limits.update(mem_storage=UNLIMITED, disk_storage=UNLIMITED, streams=UNLIMITED, consumer=UNLIMITED)
    nats: dict[str, Any] = {
        "type": "account",
        "version": 2,
        "limits": limits,
        "default_permissions": {"pub": {}, "sub": {}},
    }
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    return encode({"name": name, "sub": account, "nats": nats, "iat": issued_at}, operator)


def user_jwt(account: Key, user: str, *, name: str, permissions: Permissions | None, issued_at: int = 0) -> str:
    """A user JWT; `permissions` None: everything in its account (an operator's own tools)."""
    nats: dict[str, Any] = {"type": "user", "version": 2, "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED}
    if permissions is not None:
        nats["pub"] = {"allow": list(permissions.publish)} if permissions.publish else {"deny": [">"]}
        nats["sub"] = {"allow": list(permissions.subscribe)} if permissions.subscribe else {"deny": [">"]}
        if permissions.responses:
            nats["resp"] = {"max": 1, "ttl": 0}
    return encode({"name": name, "sub": user, "nats": nats, "iat": issued_at}, account)


def creds(jwt: str, seed: bytes) -> str:
    """A `.creds` file: the user JWT and its seed, as `nsc` writes them (nats-py reads it)."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
