"""Web console sessions: a random id in an HttpOnly cookie, its record in a NATS KV bucket.

Signing in presents an admin key once; the gateway checks it like any bearer key and stores a
`schemas.console.ConsoleSession` under the SHA-256 of a fresh random session id. The record
names the key (its id and a fingerprint of its secret), never the key, and carries the CSRF
token. Every gateway reads the same bucket, so a console behind a load balancer keeps its
session on any replica.

Each use of a session checks it afresh: not idle for longer than `idle`, not older than
`lifetime`, and its key still usable with the same secret (revoking or rotating the key ends
the session at once, on every replica). The principal is rebuilt from the key as it is now, so
a changed limit applies to the console too. A session in use is rewritten at most every
`touch_every` seconds, which moves its bucket TTL (= `idle`) forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from fastapi import Request
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from broker_api.auth import KeyStore, Principal
from schemas import streams
from schemas.codec import WireError
from schemas.console import ConsoleSession
from schemas.errors import AuthenticationError, NoCapacityError, PermissionDeniedError
from schemas.jetstream import open_bucket

log = structlog.get_logger(__name__)

COOKIE = "tokenyard_session"
SECURE_COOKIE = "__Host-tokenyard_session"  # over https: the prefix makes browsers demand Secure, Path=/, no Domain
CSRF_HEADER = "x-csrf-token"
TOUCH_EVERY = 60.0  # seconds between rewrites of a session in use (capped at a quarter of the idle time)
STATE_PRINCIPAL = "console_principal"  # request.state entries the session middleware sets
STATE_SESSION = "console_session"


@dataclass(frozen=True, slots=True)
class SignedIn:
    session_id: str  # goes to the browser's cookie and nowhere else
    record: ConsoleSession
    principal: Principal


def _entry(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def _expired() -> AuthenticationError:
    return AuthenticationError("Your console session has expired or was ended; sign in again.", code="session_expired")


class SessionStore:
    def __init__(self, kv: KeyValue, keys: KeyStore, *, idle: float, lifetime: float) -> None:
        self._kv = kv
        self._keys = keys
        self.idle = idle
        self.lifetime = lifetime
        self._touch_every = min(TOUCH_EVERY, idle / 4)

    @classmethod
    async def open(
        cls, nc: NATS, js: JetStreamContext, keys: KeyStore, *, idle: float, lifetime: float, replicas: int | None
    ) -> SessionStore:
        spec = dataclasses.replace(streams.SESSIONS, ttl=idle)
        return cls(await open_bucket(nc, js, spec, replicas=replicas), keys, idle=idle, lifetime=lifetime)

    async def sign_in(self, key: str) -> SignedIn:
        """A new session for an admin key (401 for a bad key, 403 for a key that is not an admin's)."""
        who = self._keys.authenticate(f"Bearer {key}")
        if not who.admin:
            raise PermissionDeniedError("Only admin keys (the operator's or an org's admin keys) may sign in here.")
        resolved = self._keys.resolve(who.key_id)
        if resolved is None:  # revoked between the two look-ups
            raise _expired()
        now = time.time()
        session_id = secrets.token_urlsafe(32)
        record = ConsoleSession(
            key_id=who.key_id, fingerprint=resolved[1], csrf=secrets.token_urlsafe(32), created=now, seen=now
        )
        await self._put(_entry(session_id), record)
        log.info("console.signed_in", key_id=who.key_id, org=who.org)
        return SignedIn(session_id, record, resolved[0])

    async def check(self, session_id: str, *, csrf: str | None, unsafe: bool) -> tuple[Principal, ConsoleSession]:
        """The principal of a live session; a state-changing (`unsafe`) request must carry the
        session's CSRF token. 401 for a session that is unknown, idle, too old or whose key was
        revoked or rotated; 403 for a missing or wrong CSRF token."""
        entry = _entry(session_id)
        record = await self._get(entry)
        if record is None:
            raise _expired()
        now = time.time()
        if now - record.seen > self.idle or now - record.created > self.lifetime:
            await self._delete(entry)
            raise _expired()
        resolved = self._keys.resolve(record.key_id)
        if resolved is None or not hmac.compare_digest(resolved[1], record.fingerprint) or not resolved[0].admin:
            await self._delete(entry)
            raise AuthenticationError(
                "The key this console session signed in with was revoked or rotated; sign in again.",
                code="session_revoked",
            )
        if unsafe and not (csrf and hmac.compare_digest(csrf.encode("utf-8"), record.csrf.encode("utf-8"))):
            raise PermissionDeniedError(
                f"This request needs the console session's CSRF token in the {CSRF_HEADER} header.",
                code="csrf_token_invalid",
            )
        if now - record.seen >= self._touch_every:
            record = dataclasses.replace(record, seen=now)
            await self._put(entry, record)
        return resolved[0], record

    async def sign_out(self, session_id: str) -> None:
        await self._delete(_entry(session_id))

    # --- the bucket -----------------------------------------------------------------------

    async def _get(self, entry: str) -> ConsoleSession | None:
        try:
            found = await self._kv.get(entry)
        except nats.js.errors.KeyNotFoundError:  # never there, signed out (a delete marker), or aged out
            return None
        except nats.errors.Error as e:
            raise NoCapacityError("The console's session store is not reachable; try again.", retry_after=1) from e
        try:
            return ConsoleSession.decode(found.value or b"")
        except WireError as e:
            log.error("console.bad_session", error=str(e))
            return None

    async def _put(self, entry: str, record: ConsoleSession) -> None:
        try:
            await self._kv.put(entry, record.encode())
        except nats.errors.Error as e:
            raise NoCapacityError("The console's session store is not reachable; try again.", retry_after=1) from e

    async def _delete(self, entry: str) -> None:
        try:
            await self._kv.delete(entry)
        except nats.errors.Error as e:
            raise NoCapacityError("The console's session store is not reachable; try again.", retry_after=1) from e


def signed_in(request: Request) -> Principal | None:
    """The principal of the console session this request was authenticated by, if it was
    (`broker_api.console.SessionMiddleware` sets it; a request with an Authorization header
    never has one)."""
    found = getattr(request.state, STATE_PRINCIPAL, None)
    return found if isinstance(found, Principal) else None


def current_session(request: Request) -> ConsoleSession | None:
    found = getattr(request.state, STATE_SESSION, None)
    return found if isinstance(found, ConsoleSession) else None


def session_cookie(request: Request) -> str | None:
    return request.cookies.get(SECURE_COOKIE) or request.cookies.get(COOKIE)
