"""Idle-time mode: a volunteer node takes jobs only while its machine is idle, and gives the
machine back when its owner returns.

Signals (`IdleSignal`) say what they can see as `Readings`: other programs' CPU and GPU use and
the time since the last user input (`worker.idle_machine`), or an explicit idle / busy from a
file a script writes (`FileSignal`, `--idle-signal file:PATH`, also how tests drive it). A
reading a signal cannot take is None and is simply not used. The policy over them is pure
(`IdlePolicy`, `decide`), with BOINC's defaults:

- busy at once when any reading says so: other programs use more than `cpu_percent` of the CPU
  (25 %) or other processes more than `gpu_percent` of a GPU, there was user input within the
  last `input_minutes`, the local time is outside `hours` (e.g. 22:00-07:00), or the switch
  says busy;
- idle only once every reading has said idle for `after` seconds on end (3 minutes);
- user input counts on GPU nodes, and on nodes fronting their own engine, by default (3 minutes:
  BOINC's "GPU work off while the computer is in use"), elsewhere only when asked for.

`IdleWatch` samples the signals every `poll` seconds, off the event loop, and applies the
policy. The worker asks it `may_pull()` before it asks for jobs, advertises itself paused while
it is busy, and waits on it to learn that the owner is back; then `hand_back` gives the work
back: jobs that have not streamed a token are stopped at once (another node takes them before
their first token, so the client sees one whole answer), jobs already streaming may finish
within the grace period and are then stopped (their stream ends with an explicit error).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import structlog

if TYPE_CHECKING:
    from schemas.nodes import Hardware
    from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

# BOINC's defaults
CPU_PERCENT = 25.0
IDLE_AFTER = 180.0
INPUT_MINUTES = 3.0  # "in use" means input within this long
GPU_PERCENT = 10.0  # BOINC has none: a desktop's compositor stays below this


# --- what signals see -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readings:
    """One look at the machine. None: this signal cannot tell."""

    cpu: float | None = None  # other programs' CPU use, percent of the whole machine
    gpu: float | None = None  # other processes' use of the busiest GPU, percent
    input_idle: float | None = None  # seconds since the last keyboard or mouse input
    switch: bool | None = None  # an explicit say: True idle, False busy
    note: str = ""  # why the switch says busy, for the log


def merged(readings: Iterable[Readings]) -> Readings:
    """Several signals' readings as one: the highest use, the latest input, any busy switch."""
    rs = list(readings)

    def most(values: Iterable[float | None]) -> float | None:
        seen = [v for v in values if v is not None]
        return max(seen) if seen else None

    latest = [r.input_idle for r in rs if r.input_idle is not None]
    switches = [r.switch for r in rs if r.switch is not None]
    return Readings(
        cpu=most(r.cpu for r in rs),
        gpu=most(r.gpu for r in rs),
        input_idle=min(latest) if latest else None,
        switch=all(switches) if switches else None,
        note="; ".join(r.note for r in rs if r.note and r.switch is False),
    )


class IdleSignal(Protocol):
    def read(self) -> Readings:
        """Look now. May block briefly: it is called off the event loop."""
        ...

    def close(self) -> None: ...


class FileSignal:
    """A file that says `idle` or `busy` (a script, a test, or the owner's "pause" button writes
    it). Anything else, or no file, is busy: a volunteer node takes work only when told."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)

    def read(self) -> Readings:
        try:
            word = self._path.read_text(encoding="utf-8", errors="replace").strip().lower()
        except FileNotFoundError:
            return Readings(switch=False, note=f"{self._path} does not exist")
        except OSError as e:
            return Readings(switch=False, note=f"{self._path} cannot be read ({e.strerror})")
        if word == "idle":
            return Readings(switch=True)
        if word == "busy":
            return Readings(switch=False, note=f"{self._path} says busy")
        return Readings(switch=False, note=f"{self._path} holds {word[:20]!r}, not idle or busy")

    def close(self) -> None:
        return None


class AllSignals:
    """Several signals as one (`merged`)."""

    def __init__(self, signals: Sequence[IdleSignal]) -> None:
        self._signals = list(signals)

    def read(self) -> Readings:
        return merged(s.read() for s in self._signals)

    def close(self) -> None:
        for s in self._signals:
            s.close()


# --- the policy (pure) ----------------------------------------------------------------------

_HOURS_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)-([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class HourRange:
    """Local times of day from `start` up to `end` (minutes after midnight); wraps past
    midnight when `end` < `start` (22:00-07:00)."""

    start: int
    end: int

    def contains(self, t: dt.time) -> bool:
        minute = t.hour * 60 + t.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


def parse_hours(text: str) -> tuple[HourRange, ...]:
    """`22:00-07:00` or several, comma-separated; "" is any time. ValueError says what is wrong."""
    ranges = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = _HOURS_RE.match(part)
        if not m:
            raise ValueError(f"{part!r} is not a range of local times like 22:00-07:00")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if (h1, m1) == (h2, m2):
            raise ValueError(f"{part!r} starts where it ends; leave --idle-hours empty for any time")
        ranges.append(HourRange(h1 * 60 + m1, h2 * 60 + m2))
    return tuple(ranges)


@dataclass(frozen=True, slots=True)
class IdlePolicy:
    cpu_percent: float = CPU_PERCENT
    gpu_percent: float = GPU_PERCENT
    after: float = IDLE_AFTER  # seconds every reading must say idle before the node takes work
    hours: tuple[HourRange, ...] = ()  # () = any time
    input_minutes: float = 0.0  # 0 = user input does not count

    def busy_reasons(self, r: Readings, clock: dt.time) -> tuple[str, ...]:
        """Why the machine is busy now (empty: every reading says idle)."""
        reasons = []
        if self.hours and not any(h.contains(clock) for h in self.hours):
            reasons.append(f"outside the idle hours {','.join(map(str, self.hours))}")
        if r.cpu is not None and r.cpu > self.cpu_percent:
            reasons.append(f"other programs use {r.cpu:.0f}% of the CPU (limit {self.cpu_percent:g}%)")
        if r.gpu is not None and r.gpu > self.gpu_percent:
            reasons.append(f"other processes use {r.gpu:.0f}% of a GPU (limit {self.gpu_percent:g}%)")
        if self.input_minutes > 0 and r.input_idle is not None and r.input_idle < self.input_minutes * 60:
            reasons.append(f"user input {r.input_idle:.0f} s ago")
        if r.switch is False:
            reasons.append(r.note or "the idle signal says busy")
        return tuple(reasons)


@dataclass(frozen=True, slots=True)
class IdleState:
    idle: bool = False
    quiet_since: float | None = None  # when every reading last started saying idle (None: one says busy)
    reasons: tuple[str, ...] = ("starting",)  # why not idle (empty when idle)


def decide(policy: IdlePolicy, state: IdleState, readings: Readings, *, now: float, clock: dt.time) -> IdleState:
    """The next state: busy at once when any reading says so; idle once all have said idle for
    `policy.after` seconds. `now` is a monotonic time in seconds, `clock` the local time of day."""
    reasons = policy.busy_reasons(readings, clock)
    if reasons:
        return IdleState(False, None, reasons)
    since = now if state.quiet_since is None else state.quiet_since
    if now - since >= policy.after:
        return IdleState(True, since, ())
    return IdleState(False, since, (f"idle for {now - since:.0f} s of {policy.after:g} s",))


# --- the watch (I/O) ------------------------------------------------------------------------


class Availability(Protocol):
    """What the worker asks: may it pull now, and (waiting) when that changes."""

    def may_pull(self) -> bool: ...

    async def wait_for(self, *, idle: bool) -> None:
        """Return once `may_pull()` is `idle`."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class AlwaysAvailable:
    """A node that is not in idle-time mode: always available."""

    def may_pull(self) -> bool:
        return True

    async def wait_for(self, *, idle: bool) -> None:
        if not idle:
            await asyncio.Event().wait()  # never busy

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def local_time_of_day() -> dt.time:
    return dt.datetime.now().time()


class IdleWatch:
    """Samples a signal every `poll` seconds and keeps the policy's state (see the module)."""

    def __init__(
        self,
        signal: IdleSignal,
        policy: IdlePolicy,
        *,
        poll: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        time_of_day: Callable[[], dt.time] = local_time_of_day,
    ) -> None:
        self._signal = signal
        self._policy = policy
        self._poll = poll
        self._clock = clock
        self._time_of_day = time_of_day
        self._state = IdleState()
        self._idle, self._busy = asyncio.Event(), asyncio.Event()
        self._busy.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> IdleState:
        return self._state

    @property
    def policy(self) -> IdlePolicy:
        return self._policy

    def may_pull(self) -> bool:
        return self._state.idle

    async def wait_for(self, *, idle: bool) -> None:
        await (self._idle if idle else self._busy).wait()

    async def start(self) -> None:
        p = self._policy
        log.info(
            "idle.watching",
            cpu_percent=p.cpu_percent,
            gpu_percent=p.gpu_percent,
            after=p.after,
            hours=",".join(map(str, p.hours)) or "any",
            input_minutes=p.input_minutes,
        )
        state = self.observe(await asyncio.to_thread(self._read))
        if not state.idle:
            log.info("idle.busy", reasons=list(state.reasons))
        self._task = asyncio.create_task(self._watch(), name="idle-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._signal.close)

    def observe(self, readings: Readings) -> IdleState:
        """Apply one look at the machine; on a change, wake whoever waits for it."""
        before = self._state
        self._state = decide(self._policy, before, readings, now=self._clock(), clock=self._time_of_day())
        if self._state.idle != before.idle:
            if self._state.idle:
                self._busy.clear()
                self._idle.set()
                log.info("idle.idle")
            else:
                self._idle.clear()
                self._busy.set()
                log.info("idle.busy", reasons=list(self._state.reasons))
        return self._state

    def _read(self) -> Readings:
        try:
            return self._signal.read()
        except Exception as e:  # noqa: BLE001 - a probe that breaks must not stop the watch; busy is safe
            log.exception("idle.read_failed")
            return Readings(switch=False, note=f"the idle signal failed ({type(e).__name__})")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            self.observe(await asyncio.to_thread(self._read))


async def hand_back(
    availability: Availability,
    running: Callable[[], Mapping[str, int]],
    stop: Callable[[str], None],
    *,
    grace: float,
    tick: float = 0.05,
) -> None:
    """The owner is back. `running()` maps each running job to the tokens it has streamed so
    far; `stop(job)` stops one (it ends as a retryable error: re-dispatched before its first
    token, an explicit error after). Jobs that have not streamed go back at once; the others
    may finish within `grace` seconds, then are stopped. Returns early if the machine is idle
    again before the grace period is over."""
    for job, tokens in list(running().items()):
        if tokens == 0:
            stop(job)
    deadline = time.monotonic() + grace
    while running() and time.monotonic() < deadline:
        if availability.may_pull():
            return
        await asyncio.sleep(tick)
    if availability.may_pull():
        return
    for job in list(running()):
        stop(job)


# --- from the worker's settings -------------------------------------------------------------


def parse_signal_spec(text: str) -> tuple[str, ...]:
    """`machine`, `file:PATH`, `none`, or several comma-separated (all must say idle)."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in parts:
        if p not in {"machine", "none"} and not (p.startswith("file:") and len(p) > 5):
            raise ValueError(f"{p!r} is not an idle signal (machine, file:PATH or none)")
    if "none" in parts and len(parts) > 1:
        raise ValueError("'none' turns idle-time mode off and cannot be combined with other signals")
    return parts


def availability_for(settings: WorkerSettings, hardware: Hardware) -> Availability:
    """Idle-time mode for volunteer nodes (the machine's signals unless `--idle-signal` says
    otherwise), and for any node given an `--idle-signal`; always available otherwise."""
    spec = parse_signal_spec(settings.idle_signal) or (("machine",) if settings.kind == "volunteer" else ("none",))
    if spec == ("none",):
        return AlwaysAvailable()
    input_minutes = settings.idle_input_minutes
    if input_minutes < 0:  # the default: see the module docstring
        input_minutes = INPUT_MINUTES if hardware.gpus or settings.engine_url else 0.0
    signals: list[IdleSignal] = []
    for part in spec:
        if part == "machine":
            from worker.idle_machine import IdleSetupError, MachineSignal

            port = _engine_port(settings.engine_url)
            try:
                signals.append(MachineSignal(engine_port=port, want_input=input_minutes > 0))
            except IdleSetupError as e:
                raise SystemExit(f"tokenyard worker: {e}") from None
        else:
            signals.append(FileSignal(part.removeprefix("file:")))
    policy = IdlePolicy(
        cpu_percent=settings.idle_cpu_percent,
        gpu_percent=settings.idle_gpu_percent,
        after=settings.idle_after,
        hours=parse_hours(settings.idle_hours),
        input_minutes=input_minutes,
    )
    return IdleWatch(AllSignals(signals), policy, poll=settings.idle_poll)


def _engine_port(url: str) -> int | None:
    if not url:
        return None
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)
