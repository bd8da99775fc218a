"""Orgs and API keys: stored in NATS KV, mirrored in memory by every gateway.

Each gateway watches both buckets, so a key created or revoked through any replica takes
effect on every replica as soon as the KV update arrives (milliseconds; the promise is 2 s).
A watch whose consumer died with a NATS node is noticed within seconds (the bucket has moved on
and the watch brought nothing) and reopened once the bucket has a leader again.
Authentication is then a dictionary look-up and one HMAC: no round trip per request.

A key is `ty_<id>_<secret>`; only HMAC-SHA256(pepper, key) is stored. The id finds the
record; `hmac.compare_digest` compares digests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from broker_api.unavailable import retried
from schemas import streams
from schemas.codec import WireError
from schemas.errors import NotFoundError
from schemas.jetstream import follow, open_bucket
from schemas.streams import BucketSpec
from schemas.tenancy import ROOT_ORG, KeyRecord, OrgRecord

__all__ = ["ROOT_ORG", "Directory", "Mirror", "parse_key"]

log = structlog.get_logger(__name__)

SYNC_TIMEOUT = 10.0
STALE_CHECK = 1.0  # seconds without an update before the watch is checked against the stream
STALE_AFTER = 1.0  # seconds the stream may stay ahead of the watch (an update in flight) before it is reopened


def parse_key(key: str) -> tuple[str, str] | None:
    """(`id`, `secret`) of a `ty_<id>_<secret>` key, or None."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != "ty" or not key_id or not secret:
        return None
    return key_id, secret


class StaleWatchError(Exception):
    """The bucket moved on and the watch brought nothing: its consumer is gone (it lived on a
    NATS node that died; nats-py notices only after two missed 5 s heartbeats, and gives up
    if re-creating it fails during the stream's leader election)."""


class Mirror:
    """A KV bucket mirrored into a dict by a watch (reopened whenever it fails, or goes stale:
    when the bucket's stream has writes the watch has not brought for `STALE_AFTER` seconds)."""

    def __init__(self, kv: KeyValue, js: JetStreamContext, spec: BucketSpec, decode: Callable[[bytes], Any]) -> None:
        self.kv = kv
        self._js = js
        self._stream = spec.stream.name
        self._decode = decode
        self._name = spec.bucket
        self.items: dict[str, Any] = {}
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seen = 0  # the highest stream sequence (revision) the watch brought
        self._behind_since: float | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(follow(self._entries, self._apply, name=self._name))
        await asyncio.wait_for(self._synced.wait(), SYNC_TIMEOUT)

    async def catch_up(self, timeout: float) -> bool:
        """Wait until the mirror holds every write the bucket had when asked (a change another
        gateway made a moment ago included); False if it did not within `timeout`, or if the
        bucket's last write could not be read (a mirror that cannot tell is not caught up)."""
        last = await self._last_sequence()
        if last is None:
            return False
        deadline = time.monotonic() + timeout
        while self._seen < last:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _entries(self) -> AsyncIterator[KeyValue.Entry | None]:
        opened_at = await self._last_sequence() or 0  # all up to here comes with the watch's first sync
        watcher = await self.kv.watchall()
        self._behind_since = None
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=STALE_CHECK)
                except (asyncio.TimeoutError, nats.errors.TimeoutError):
                    await self._check_stale()
                    continue
                if entry is None:  # synced: whatever the stream held at the start is in
                    self._seen = max(self._seen, opened_at)
                yield entry
        finally:
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()

    async def _last_sequence(self) -> int | None:
        """The bucket's last stream sequence; None when the server did not say."""
        try:
            return int((await self._js.stream_info(self._stream)).state.last_seq)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            log.info("directory.stream_info_failed", bucket=self._name, error=repr(e))
            return None

    async def _check_stale(self) -> None:
        """Raise StaleWatchError (so `follow` reopens the watch) once the stream has stayed
        ahead of what the watch brought for STALE_AFTER seconds."""
        last = await self._last_sequence()
        if last is None:  # cannot tell now; the next check asks again
            return
        if last <= self._seen:
            self._behind_since = None
            return
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        elif now - self._behind_since >= STALE_AFTER:
            raise StaleWatchError(f"{self._name}: the stream is past revision {self._seen}")

    def _apply(self, entry: KeyValue.Entry | None) -> None:
        if entry is None:  # the current entries are all in
            self._synced.set()
            return
        self._seen = max(self._seen, entry.revision or 0)
        if entry.operation in ("DEL", "PURGE") or entry.value is None:
            self.items.pop(entry.key, None)
        else:
            try:
                self.items[entry.key] = self._decode(entry.value)
            except WireError as e:  # a record we cannot read must not stop the mirror
                log.error("directory.bad_record", bucket=self._name, key=entry.key, error=str(e))
        if entry.delta == 0:
            self._synced.set()


class Directory:
    def __init__(self, keys: KeyValue, orgs: KeyValue, js: JetStreamContext, *, pepper: bytes) -> None:
        self._keys = Mirror(keys, js, streams.KEYS, KeyRecord.decode)
        self._orgs = Mirror(orgs, js, streams.ORGS, OrgRecord.decode)
        self._pepper = pepper

    @classmethod
    async def open(cls, nc: NATS, js: JetStreamContext, *, pepper: bytes, replicas: int | None) -> Directory:
        keys = await open_bucket(nc, js, streams.KEYS, replicas=replicas)
        d = cls(keys, await open_bucket(nc, js, streams.ORGS, replicas=replicas), js, pepper=pepper)
        await d._keys.start()
        await d._orgs.start()
        if ROOT_ORG not in d._orgs.items:
            await d.put_org(OrgRecord(id=ROOT_ORG, name="Default", created=time.time()))
        return d

    async def close(self) -> None:
        await self._keys.stop()
        await self._orgs.stop()

    def digest(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode("utf-8"), hashlib.sha256).hexdigest()

    # --- reads (memory) -----------------------------------------------------------------

    def key(self, key_id: str) -> KeyRecord | None:
        return self._keys.items.get(key_id)

    def org(self, org_id: str) -> OrgRecord | None:
        return self._orgs.items.get(org_id)

    def keys(self, org: str | None) -> list[KeyRecord]:
        return sorted((k for k in self._keys.items.values() if org is None or k.org == org), key=lambda k: k.created)

    def orgs(self) -> list[OrgRecord]:
        return sorted(self._orgs.items.values(), key=lambda o: o.created)

    def verify(self, key: str) -> KeyRecord | None:
        """The record of a presented key, if it is a key we issued (usable or not)."""
        parsed = parse_key(key)
        if parsed is None:
            return None
        record = self.key(parsed[0])
        if record is None or not hmac.compare_digest(record.digest, self.digest(key)):
            return None
        return record

    # --- writes (KV; the mirrors catch up through their watches) --------------------------
    # Both buckets are R3 on a cluster: a write needs a quorum (two nodes of three), and waits
    # out a leader election; without a quorum the caller sees a 503 with Retry-After.

    async def put_org(self, org: OrgRecord) -> None:
        await retried(lambda: self._orgs.kv.put(org.id, org.encode()), what="the org change")
        self._orgs.items[org.id] = org

    async def put_key(self, record: KeyRecord) -> None:
        await retried(lambda: self._keys.kv.put(record.id, record.encode()), what="the API key change")
        self._keys.items[record.id] = record

    async def issue_key(self, template: KeyRecord) -> tuple[str, KeyRecord]:
        """Store a new key built from `template` (its id and digest are made here); returns the
        secret, which is never stored or shown again."""
        key_id = secrets.token_hex(6)
        secret = f"ty_{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(**{**_fields(template), "id": key_id, "digest": self.digest(secret), "created": time.time()})
        await self.put_key(record)
        return secret, record

    async def rotate_key(self, record: KeyRecord) -> tuple[str, KeyRecord]:
        """A new secret for the same key id (same org, limits, policies and usage history); the
        old secret stops working on every gateway as soon as the update arrives."""
        secret = f"ty_{record.id}_{secrets.token_urlsafe(32)}"
        rotated = KeyRecord(**{**_fields(record), "digest": self.digest(secret)})
        await self.put_key(rotated)
        return secret, rotated

    def require_org(self, org_id: str) -> OrgRecord:
        org = self.org(org_id)
        if org is None:
            raise NotFoundError(f"No org with id '{org_id}'.", param="org")
        return org


def _fields(record: KeyRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}
