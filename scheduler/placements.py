"""At most one placement of a job per dispatch, across schedulers and nats-server restarts.

A gateway whose submission's answer is late asks again, and the retry may reach another
scheduler. The work message's id (`<job id>.<dispatch>`) made JetStream drop the second
publish only while it remembered the id: a nats-server restarted after the job's message was
acked and removed from the work queue has forgotten it (it rebuilds its dedupe from the
messages it still holds), so the other scheduler's publish was stored and a worker ran the
job again, after its answer was given (bench/RESULTS.md section 9). So the placement itself is
recorded, in the PLACEMENTS bucket (`schemas.placements`), by a create that fails if the entry
exists, before anything is reserved or published:

- created: this scheduler places the job, then rewrites the entry "placed" (`placed`), or
  deletes it if the placement failed (`abandon`: refused, full, no leader), so a retry places it;
- found "placed": the job is placed; the submission is answered what the first one was, and
  nothing is reserved or published again;
- found "placing": another scheduler is placing it now, or died doing so (SIGKILLed between
  its publish and its record: the long chaos run's run 9, a 20 s wait and a 503 for a job that
  ran). Three ways out, tried in order at each look:
  - the gateway heard from an attempt of this dispatch (`Submission.started`): the job is in
    its work queue, so the submission is answered from the claim, which holds the placement's
    pool and model, and nothing is published again;
  - the claiming scheduler no longer runs (its `subjects.scheduler_alive` subject has no
    responder: NATS knows at once when a process's connection closed): the claim is taken
    over now, by compare-and-set. Its publish, if it landed, is still in the work queue (no
    attempt spoke of it yet), so the new one is a duplicate JetStream drops by message id;
  - a claim older than `STALE` (its scheduler alive but stuck: a SIGSTOP) is taken over so too.
  Otherwise wait for its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from scheduler.publish import PATIENCE, TIMEOUT, TRANSIENT
from schemas import subjects
from schemas.codec import WireError
from schemas.errors import UnavailableError
from schemas.jetstream import patiently
from schemas.placements import PLACED, PLACING, Placement

log = structlog.get_logger(__name__)

STALE = PATIENCE + TIMEOUT + 3.0  # seconds: longer than any placement's publish may take
POLL = 0.05  # seconds between looks at a placement another scheduler is making
RETRY_AFTER = 2.0
RECORD_WAIT = 0.5  # seconds a stopping scheduler waits for its placements' records
ALIVE_TIMEOUT = 0.5  # seconds for a claiming scheduler's "alive": no answer in time counts as alive (busy, stopped)
ALIVE_EVERY = 1.0  # seconds between asks while waiting on one claim

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Claim:
    """This scheduler's claim on a placement: the entry's revision it wrote."""

    key: str
    revision: int
    placement: Placement


class Placements:
    def __init__(self, kv: KeyValue, nc: NATS, *, instance: str, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._nc = nc
        self.instance = instance  # this scheduler's: its claims carry it (`Placement.scheduler`)
        self._clock = clock
        self._recording: set[asyncio.Task[None]] = set()  # `record` writes in flight (strong refs)
        self._alive: Subscription | None = None

    async def start(self) -> None:
        """Answer "alive" for this scheduler's claims (see the module's docstring)."""
        self._alive = await self._nc.subscribe(subjects.scheduler_alive(self.instance), cb=self._on_alive)

    async def _on_alive(self, msg: Msg) -> None:
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(b"")

    async def claim(self, key: str, placing: Placement, *, started: bool = False) -> Claim | Placement:
        """Our claim on `key` for `placing` (its `by` a token of this claim's own), or the
        placement another scheduler made of it (state placed; or still "placing" where the
        gateway heard from the job: `started`). KV errors other than a stream between leaders
        propagate (the scheduler answers 503; the gateway may ask again)."""
        placing = replace(placing, scheduler=self.instance)
        deadline = time.monotonic() + STALE + PATIENCE
        asked = 0.0  # monotonic time the claiming scheduler was last asked whether it runs
        while True:
            try:
                return Claim(key, await self._patiently(lambda: self._kv.create(key, placing.encode())), placing)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # someone placed it, or is placing it (or our own create, which timed out here, landed)
            found = await self._patiently(lambda: self._get(key))
            if found is not None:
                placement, revision = found
                if placement.state == PLACED:
                    return placement
                if placement.by == placing.by:
                    return Claim(key, revision, placing)
                if started:  # an attempt spoke: it is in its work queue, wherever its answer went
                    log.info("placement.started_unrecorded", key=key, pool=placement.pool)
                    return placement
                gone = False
                if time.monotonic() - asked >= ALIVE_EVERY:
                    asked = time.monotonic()
                    gone = not await self._runs(placement.scheduler)
                if gone or self._clock() - placement.at > STALE:  # its scheduler died, or is stuck
                    log.info("placement.taken_over", key=key, dead=gone)
                    try:
                        return Claim(key, await self._kv.update(key, placing.encode(), last=revision), placing)
                    except nats.js.errors.KeyWrongLastSequenceError:
                        continue  # another took it over first: look again
            if time.monotonic() >= deadline:
                raise UnavailableError(
                    "Another scheduler is still placing this job. Try again shortly.", retry_after=RETRY_AFTER
                )
            await asyncio.sleep(POLL)

    async def placed(self, claim: Claim, *, seq: int) -> None:
        """The job is stored (in its work queue at `seq`, or held: 0): say so to the others. If
        the write fails, the entry stays "placing" and a retry takes it over once stale."""
        done = replace(claim.placement, state=PLACED, seq=seq)
        try:
            await self._patiently(lambda: self._kv.update(claim.key, done.encode(), last=claim.revision))
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as e:
            log.warning("placement.record_failed", key=claim.key, error=repr(e))

    def record(self, claim: Claim, *, seq: int) -> None:
        """`placed`, written while the admission is answered: the answer need not wait for it
        (a submission of the same placement meanwhile waits for it, as for any "placing")."""
        task = asyncio.create_task(self.placed(claim, seq=seq))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _runs(self, instance: str) -> bool:
        """The scheduler `instance` still runs, as far as NATS can tell: False only when nobody
        answers on its subject ("no responders": its connection is closed). A claim written
        before claims named their scheduler counts as alive (the stale rule takes it over)."""
        if not instance:
            return True
        try:
            await self._nc.request(subjects.scheduler_alive(instance), b"", timeout=ALIVE_TIMEOUT)
        except nats.errors.NoRespondersError:
            return False
        except (nats.errors.Error, asyncio.TimeoutError):
            return True  # slow, stopped, or our own connection between servers: wait, as before
        return True

    async def stop(self) -> None:
        """Give the records in flight a moment (one not written stays "placing": taken over by
        the next scheduler that finds it), then stop answering "alive"."""
        if self._recording:
            await asyncio.wait(set(self._recording), timeout=RECORD_WAIT)
        if self._alive is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._alive.unsubscribe()

    async def abandon(self, claim: Claim) -> None:
        """The placement failed: remove the claim so the gateway's next try may place the job."""
        try:
            await self._kv.delete(claim.key, last=claim.revision)
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as e:
            log.warning("placement.abandon_failed", key=claim.key, error=repr(e))  # it goes stale

    async def _patiently(self, op: Callable[[], Awaitable[T]]) -> T:
        """`op`, asked again while the bucket's stream has no leader (a NATS node died), as a
        job's publish is (`scheduler.publish`): up to PATIENCE seconds."""
        return await patiently(op, transient=lambda e: isinstance(e, TRANSIENT), patience=PATIENCE, what="placement")

    async def _get(self, key: str) -> tuple[Placement, int] | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # also deleted: an abandoned claim
            return None
        try:
            return Placement.decode(entry.value or b""), entry.revision or 0
        except WireError as e:
            # unreadable: a claim long stale, taken over at once (by compare-and-set)
            log.warning("placement.bad_entry", key=key, error=str(e))
            return Placement(PLACING, 0.0), entry.revision or 0
