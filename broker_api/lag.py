"""How far behind the gateway's own event loop ran: time in which it read nothing it was sent.

A loaded gateway (thousands of open streams, the load client and nats-server on the same two
cores: bench/RESULTS.md, section 8) runs seconds behind, and the beats and events its workers
sent meanwhile wait unread in its socket and in its inbox subscription. A job's silence clock
(`broker_api.jobrun`, stamped when the gateway *reads* an event) must not count that time: the
attempt was alive, the gateway was late.

`LoopLag.run` (a task of the gateway's lifespan) sleeps `period` over and over and keeps how
late each wake-up came: a late wake-up is a stretch in which no callback of this loop ran on
time, the socket's reader and the inbox's handler included. `behind_since(t, now)` adds up that
lateness between `t` and `now`, counting the wake-up that is overdue at `now` (the turn that
asks may be the first one after a long block, before the monitor itself ran again).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

PERIOD = 0.05  # seconds between the monitor's wake-ups: its resolution
MIN_LATE = 0.005  # seconds late a wake-up must be to be kept (scheduling noise is not lag)
KEEP = 60.0  # seconds of history kept (at least as long as the longest silence bound asked about)
WARN_LATE = 1.0  # a wake-up this late is logged: the gateway's loop was blocked or swamped


class LoopLag:
    """The lateness of this event loop's wake-ups, as a history `behind_since` reads."""

    def __init__(
        self, *, period: float = PERIOD, keep: float = KEEP, counted: Callable[[float], None] = lambda late: None
    ) -> None:
        self._counted = counted  # each late wake-up's lateness, for the metrics
        self._period = period
        self._keep = keep
        self._last = time.monotonic()  # the last wake-up, late or not
        self._ticks: list[float] = []  # monotonic times of the late wake-ups kept, ascending
        self._late: list[float] = []  # ... how late each came
        self._sums: list[float] = []  # ... the lateness of every one kept up to and including it

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            now = time.monotonic()
            late = now - self._last - self._period
            self._last = now
            if late > MIN_LATE:
                self._record(now, late)
                self._counted(late)
            if late > WARN_LATE:
                log.warning("api.loop_behind", seconds=round(late, 3))

    def _record(self, now: float, late: float) -> None:
        self._ticks.append(now)
        self._late.append(late)
        self._sums.append((self._sums[-1] if self._sums else 0.0) + late)
        if self._ticks[0] < now - 2 * self._keep:  # trimmed in batches: each trim copies the lists
            cut = bisect.bisect_left(self._ticks, now - self._keep)
            del self._ticks[:cut], self._late[:cut], self._sums[:cut]

    def behind_since(self, t: float, now: float) -> float:
        """Seconds in which this loop was behind between monotonic times `t` and `now`: it ran
        nothing it should have run, so nothing sent to it in that time could be read."""
        behind = 0.0
        i = bisect.bisect_right(self._ticks, t)
        if i < len(self._ticks):
            # a wake-up late by L after t: the loop was stuck for the L before it, or since t
            behind = min(self._late[i], self._ticks[i] - t) + self._sums[-1] - self._sums[i]
        overdue = now - self._last - self._period  # the wake-up that should have come already
        if overdue > 0:
            behind += min(overdue, now - max(t, self._last))
        return behind
