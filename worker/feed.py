"""Standing pull requests: jobs arrive as soon as they are queued, with no pull per job.

A worker keeps pull requests outstanding on each of its models' consumers for as many jobs as
it has free slots. JetStream delivers queued jobs against them at once; when a request
expires, the server's 408 status says how many jobs it did not deliver, and the worker asks
again. So a worker below capacity sends no request per job at all, and one at capacity sends
one small request each time a slot frees, off the job's critical path.

Invariant: `running + outstanding <= slots` (a job arrives only against a request made when a
slot was free), so a worker never holds a job it has no room for. A worker with more models than
free slots cannot keep a request standing on every model: it asks on the models asked least
recently first, with requests short enough (`expiry`) that every model's turn comes round within
`ROTATION` seconds, so a model late in the list is not starved by the ones before it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import subjects

log = structlog.get_logger(__name__)

EXPIRES = 5.0  # seconds a pull request stands before the server retires it (and says so)
STALE = EXPIRES + 3.0  # no word on a feed for this long: forget its requests (lost on a reconnect)
ROTATION = 2.0  # seconds for every model's turn to come round when models outnumber free slots
SHORTEST = 0.25  # seconds: the shortest request, which bounds the pull traffic that rotation costs


def expiry(slots: int, feeds: int) -> float:
    """How long a pull request stands: the full EXPIRES while every model can keep one standing,
    shorter as models outnumber slots, so the requests rotate through them within ROTATION."""
    if feeds <= slots:
        return EXPIRES
    return min(EXPIRES, max(SHORTEST, ROTATION * slots / feeds))


class Feed:
    """Pull requests on one consumer, delivering jobs to `on_job`."""

    def __init__(
        self, nc: NATS, durable: str, on_job: Callable[[Msg], None], *, then: Callable[[], Awaitable[None]]
    ) -> None:
        """`on_job` takes each job delivered; `then` runs after every message (the worker tops
        up its pull requests there)."""
        self._nc = nc
        self._api = subjects.js_consumer_next(subjects.WORK_STREAM, durable)
        self._on_job = on_job
        self._then = then
        self.outstanding = 0
        self.heard = time.monotonic()
        self.asked = 0.0  # when this feed last made a request: the least recent asks first
        self._inbox = ""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        """Stop taking jobs. The server drops pull requests whose inbox no one listens on, so the
        jobs they would have brought go to other workers at once; `start` again asks afresh."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        self.outstanding = 0

    async def request(self, batch: int, expires: float = EXPIRES) -> None:
        self.outstanding += batch
        body = json.dumps({"batch": batch, "expires": int(expires * 1e9)}).encode()
        try:
            await self._nc.publish(self._api, body, reply=self._inbox)
            self.asked = time.monotonic()  # only a request made: one that failed keeps its turn
        except nats.errors.Error as e:
            self.outstanding -= batch
            log.warning("worker.pull_failed", error=str(e))

    def forget_if_stale(self, now: float) -> None:
        if self.outstanding and now - self.heard > STALE:
            log.info("worker.pull_requests_lost", outstanding=self.outstanding)
            self.outstanding = 0

    async def _on_msg(self, msg: Msg) -> None:
        self.heard = time.monotonic()
        status = msg.header.get("Status") if msg.header else None  # nats-py parses the status line
        if status is not None:
            self._on_status(str(status), msg)
        else:
            self.outstanding = max(0, self.outstanding - 1)
            self._on_job(msg)
        await self._then()

    def _on_status(self, status: str, msg: Msg) -> None:
        if status == "100":  # idle heartbeat / flow control
            return
        pending = (msg.header or {}).get("Nats-Pending-Messages")
        if pending is not None and str(pending).isdigit():
            self.outstanding = max(0, self.outstanding - int(pending))  # what that request never delivered
        else:
            self.outstanding = 0  # 409 and the like: that request is gone; ask afresh
            log.debug("worker.pull_status", status=status, description=(msg.header or {}).get("Description"))
