"""Console sessions (`broker_api.sessions`) against a real nats-server: what ends a session
(idle time, lifetime, its key revoked or rotated, signing out), the CSRF rule, and that a
record in the bucket holds no key and cannot be used to take a session over."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from broker_api.auth import KeyStore
from broker_api.directory import Directory
from broker_api.embedded_nats import NatsServer
from broker_api.sessions import SessionStore
from schemas import streams
from schemas.console import ConsoleSession
from schemas.errors import AuthenticationError, PermissionDeniedError
from schemas.tenancy import KeyRecord
from tests.stack import ADMIN_KEY


@dataclass
class Env:
    nc: NATS
    directory: Directory
    keys: KeyStore

    async def store(self, *, idle: float = 60.0, lifetime: float = 3600.0) -> SessionStore:
        return await SessionStore.open(
            self.nc, self.nc.jetstream(), self.keys, idle=idle, lifetime=lifetime, replicas=1
        )

    async def admin_key(self, org: str = "default") -> tuple[str, KeyRecord]:
        template = KeyRecord(id="", org=org, name="ops", digest="", created=0.0, admin=True)
        return await self.directory.issue_key(template)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    server = NatsServer(tmp_path / "nats", sync_always=False).start()
    nc = await nats.connect(server.url)
    directory = await Directory.open(nc, nc.jetstream(), pepper=b"pepper", replicas=1)
    try:
        yield Env(nc, directory, KeyStore(ADMIN_KEY, directory))
    finally:
        await directory.close()
        await nc.close()
        server.stop()


async def test_a_session_names_its_key_and_never_holds_it(env: Env) -> None:
    store = await env.store()
    secret, record = await env.admin_key()
    done = await store.sign_in(secret)
    who, session = await store.check(done.session_id, csrf=None, unsafe=False)
    assert (who.key_id, who.org, who.admin, who.root) == (record.id, "default", True, False)
    kv = await env.nc.jetstream().key_value(streams.SESSIONS.bucket)
    entries = await kv.keys()
    assert entries == [hashlib.sha256(done.session_id.encode()).hexdigest()]  # the id itself is not stored
    raw = (await kv.get(entries[0])).value or b""
    assert secret.encode() not in raw and secret.split("_", 2)[2].encode() not in raw
    assert done.session_id.encode() not in raw
    assert ConsoleSession.decode(raw) == session
    with pytest.raises(AuthenticationError):  # the bucket's entry name is no session id
        await store.check(entries[0], csrf=None, unsafe=False)


async def test_only_admin_keys_sign_in(env: Env) -> None:
    store = await env.store()
    template = KeyRecord(id="", org="default", name="app", digest="", created=0.0)
    app_key, _ = await env.directory.issue_key(template)
    with pytest.raises(PermissionDeniedError):
        await store.sign_in(app_key)
    with pytest.raises(AuthenticationError):
        await store.sign_in("ty_0123456789ab_not-a-real-secret")
    root = await store.sign_in(ADMIN_KEY)
    assert root.principal.root and root.principal.key_id == "admin"


async def test_state_changing_requests_need_the_csrf_token(env: Env) -> None:
    store = await env.store()
    done = await store.sign_in(ADMIN_KEY)
    await store.check(done.session_id, csrf=None, unsafe=False)
    for wrong in (None, "", "nope", done.record.csrf[:-1]):
        with pytest.raises(PermissionDeniedError) as refused:
            await store.check(done.session_id, csrf=wrong, unsafe=True)
        assert refused.value.status == 403 and refused.value.code == "csrf_token_invalid"
    await store.check(done.session_id, csrf=done.record.csrf, unsafe=True)


async def test_an_idle_session_expires_and_one_in_use_lives_on(env: Env) -> None:
    store = await env.store(idle=1.0)
    busy = await store.sign_in(ADMIN_KEY)
    idle = await store.sign_in(ADMIN_KEY)
    deadline = time.monotonic() + 1.8
    while time.monotonic() < deadline:  # used every 0.2 s: touched, so it outlives the idle time
        await store.check(busy.session_id, csrf=None, unsafe=False)
        await asyncio.sleep(0.2)
    await store.check(busy.session_id, csrf=None, unsafe=False)
    with pytest.raises(AuthenticationError) as expired:
        await store.check(idle.session_id, csrf=None, unsafe=False)
    assert expired.value.code == "session_expired"


async def test_a_session_ends_at_its_lifetime_even_in_use(env: Env) -> None:
    store = await env.store(idle=60.0, lifetime=0.6)
    done = await store.sign_in(ADMIN_KEY)
    await store.check(done.session_id, csrf=None, unsafe=False)
    await asyncio.sleep(0.8)
    with pytest.raises(AuthenticationError):
        await store.check(done.session_id, csrf=None, unsafe=False)


async def test_revoking_or_rotating_the_key_ends_its_sessions(env: Env) -> None:
    store = await env.store()
    secret, record = await env.admin_key()
    first, second = await store.sign_in(secret), await store.sign_in(secret)
    new_secret, rotated = await env.directory.rotate_key(record)
    assert rotated.id == record.id and new_secret != secret
    with pytest.raises(AuthenticationError) as ended:
        await store.check(first.session_id, csrf=None, unsafe=False)
    assert ended.value.code == "session_revoked"
    third = await store.sign_in(new_secret)
    await store.check(third.session_id, csrf=None, unsafe=False)
    await env.directory.put_key(dataclasses.replace(rotated, revoked=time.time()))
    for session in (second, third):
        with pytest.raises(AuthenticationError):
            await store.check(session.session_id, csrf=None, unsafe=False)


async def test_signing_out_ends_the_session_for_every_replica(env: Env) -> None:
    one, other = await env.store(), await env.store()
    done = await one.sign_in(ADMIN_KEY)
    await other.check(done.session_id, csrf=None, unsafe=False)
    await one.sign_out(done.session_id)
    with pytest.raises(AuthenticationError):
        await other.check(done.session_id, csrf=None, unsafe=False)


async def test_a_record_that_cannot_be_read_is_no_session(env: Env) -> None:
    store = await env.store()
    done = await store.sign_in(ADMIN_KEY)
    kv = await env.nc.jetstream().key_value(streams.SESSIONS.bucket)
    await kv.put(hashlib.sha256(done.session_id.encode()).hexdigest(), b"\x93garbage")
    with pytest.raises(AuthenticationError):
        await store.check(done.session_id, csrf=None, unsafe=False)
