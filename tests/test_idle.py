"""Idle-time mode: the policy as a pure function (thresholds, the idle-after delay, hours that
wrap midnight, busy at once), the signals on this machine, the hand-back rule, and real
volunteer workers driven by the file signal through the whole stack: idle -> they pull and
serve; busy -> they stop pulling at once, queued work goes to another worker, a streaming job
finishes within the grace period or ends with an explicit error, one that has not streamed is
handed back and the client gets the whole answer from the other worker."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from schemas.nodes import Gpu, Hardware
from tests.helpers import ECHO, Sse, watch_adverts
from tests.stack import Stack, auth_headers, free_port
from worker.idle import (
    AlwaysAvailable,
    FileSignal,
    HourRange,
    IdlePolicy,
    IdleState,
    IdleWatch,
    Readings,
    availability_for,
    decide,
    hand_back,
    merged,
    parse_hours,
    parse_signal_spec,
)
from worker.idle_machine import CpuUse, InterruptIdle, MachineSignal, OwnProcesses, i8042_interrupts
from worker.settings import WorkerSettings

NOON = dt.time(12, 0)
QUIET = Readings(cpu=3.0, gpu=0.0, input_idle=3600.0)
CPU_ONLY = Hardware(cpu="test", cores=2, memory=1 << 30)


def run(policy: IdlePolicy, steps: list[tuple[float, Readings]], clock: dt.time = NOON) -> list[IdleState]:
    """The states after each (time, readings) step, from the start state."""
    state, out = IdleState(), []
    for now, readings in steps:
        state = decide(policy, state, readings, now=now, clock=clock)
        out.append(state)
    return out


# --- the policy -----------------------------------------------------------------------------


def test_the_defaults_are_boincs() -> None:
    p = IdlePolicy()
    assert (p.cpu_percent, p.after, p.input_minutes, p.hours) == (25.0, 180.0, 0.0, ())


@pytest.mark.parametrize(
    ("readings", "busy"),
    [
        (Readings(cpu=25.0), False),  # at the threshold: still idle ("more than 25 %")
        (Readings(cpu=25.1), True),
        (Readings(gpu=10.0), False),
        (Readings(gpu=10.5), True),
        (Readings(cpu=None, gpu=None), False),  # a signal that cannot tell is not used
        (Readings(input_idle=179.0), True),  # input 3 minutes ago is "in use" on this policy
        (Readings(input_idle=180.0), False),
        (Readings(switch=False, note="paused by a script"), True),
        (Readings(switch=True), False),
        (Readings(cpu=90.0, gpu=90.0, input_idle=1.0, switch=False), True),
    ],
)
def test_thresholds(readings: Readings, busy: bool) -> None:
    policy = IdlePolicy(cpu_percent=25, gpu_percent=10, input_minutes=3, after=0)
    reasons = policy.busy_reasons(readings, NOON)
    assert bool(reasons) is busy
    [state] = run(policy, [(0.0, readings)])
    assert state.idle is not busy


def test_reasons_say_what_is_busy() -> None:
    policy = IdlePolicy(input_minutes=3, hours=parse_hours("22:00-07:00"))
    reasons = policy.busy_reasons(Readings(cpu=80, gpu=50, input_idle=12, switch=False, note="x says busy"), NOON)
    assert reasons == (
        "outside the idle hours 22:00-07:00",
        "other programs use 80% of the CPU (limit 25%)",
        "other processes use 50% of a GPU (limit 10%)",
        "user input 12 s ago",
        "x says busy",
    )


def test_input_is_ignored_unless_asked_for() -> None:
    assert IdlePolicy(input_minutes=0).busy_reasons(Readings(input_idle=0.0), NOON) == ()


def test_idle_only_after_the_delay_and_busy_at_once() -> None:
    busy = Readings(cpu=60.0)
    states = run(
        IdlePolicy(after=180),
        [
            (0.0, QUIET),
            (100.0, QUIET),
            (179.9, QUIET),
            (180.0, QUIET),  # quiet for 180 s on end: idle
            (500.0, QUIET),
            (500.5, busy),  # busy at once, whatever came before
            (501.0, QUIET),  # the delay starts again from here
            (680.0, QUIET),
            (681.0, QUIET),
        ],
    )
    assert [s.idle for s in states] == [False, False, False, True, True, False, False, False, True]
    assert states[5].reasons == ("other programs use 60% of the CPU (limit 25%)",)
    assert states[6].quiet_since == 501.0 and states[6].reasons == ("idle for 0 s of 180 s",)
    assert states[8].reasons == ()


def test_a_short_busy_spell_restarts_the_delay() -> None:
    states = run(
        IdlePolicy(after=10), [(0, QUIET), (9, QUIET), (9.5, Readings(switch=False)), (10, QUIET), (19, QUIET)]
    )
    assert [s.idle for s in states] == [False, False, False, False, False]
    assert run(IdlePolicy(after=10), [(0, QUIET), (10, QUIET)])[-1].idle


def test_no_delay_means_idle_at_the_first_quiet_look() -> None:
    assert [s.idle for s in run(IdlePolicy(after=0), [(5.0, QUIET), (5.1, Readings(switch=False)), (5.2, QUIET)])] == [
        True,
        False,
        True,
    ]


@pytest.mark.parametrize(
    ("hours", "inside", "outside"),
    [
        ("22:00-07:00", ["22:00", "23:59", "00:00", "03:30", "06:59"], ["07:00", "12:00", "21:59"]),
        ("09:00-17:30", ["09:00", "12:00", "17:29"], ["08:59", "17:30", "23:00", "00:00"]),
        ("23:00-01:00,12:00-13:00", ["23:30", "00:59", "12:15"], ["01:00", "11:59", "13:00", "22:59"]),
        ("0:00-23:59", ["00:00", "12:00", "23:58"], ["23:59"]),
    ],
)
def test_hours_wrap_midnight(hours: str, inside: list[str], outside: list[str]) -> None:
    policy = IdlePolicy(after=0, hours=parse_hours(hours))
    for t in inside:
        assert run(policy, [(0.0, QUIET)], clock=dt.time.fromisoformat(t))[0].idle, t
    for t in outside:
        [state] = run(policy, [(0.0, QUIET)], clock=dt.time.fromisoformat(t))
        assert not state.idle and state.reasons[0].startswith("outside the idle hours"), t


def test_hours_opening_starts_the_delay() -> None:
    policy = IdlePolicy(after=60, hours=parse_hours("22:00-07:00"))
    state = IdleState()
    for now, clock in [(0, "21:59"), (30, "21:59:30"), (60, "22:00"), (100, "22:00:40"), (120, "22:01")]:
        state = decide(policy, state, QUIET, now=now, clock=dt.time.fromisoformat(clock))
    assert state.idle and state.quiet_since == 60


@pytest.mark.parametrize("bad", ["22:00", "25:00-01:00", "10:00-10:00", "ten-eleven", "22:00-07:60", "22-07"])
def test_bad_hours_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_hours(bad)


def test_hours_parse_and_print() -> None:
    assert parse_hours("") == ()
    assert parse_hours(" 22:00-07:00 , 9:05-9:30") == (HourRange(1320, 420), HourRange(545, 570))
    assert [str(h) for h in parse_hours("22:00-07:00,9:05-9:30")] == ["22:00-07:00", "09:05-09:30"]


def test_readings_merge_to_the_busiest() -> None:
    m = merged(
        [
            Readings(cpu=10, input_idle=500),
            Readings(cpu=40, gpu=5, input_idle=20),
            Readings(switch=True),
            Readings(switch=False, note="b"),
        ]
    )
    assert m == Readings(cpu=40, gpu=5, input_idle=20, switch=False, note="b")
    assert merged([Readings(switch=True), Readings()]) == Readings(switch=True)
    assert merged([]) == Readings()


# --- signals --------------------------------------------------------------------------------


def test_file_signal(tmp_path: Path) -> None:
    path = tmp_path / "idle"
    signal = FileSignal(path)
    assert signal.read().switch is False and "does not exist" in signal.read().note
    for text, switch in [("idle", True), ("  IDLE\n", True), ("busy\n", False), ("maybe", False), ("", False)]:
        path.write_text(text)
        assert signal.read().switch is switch, text
    path.write_text("maybe")
    assert "holds 'maybe'" in signal.read().note


def test_signal_specs() -> None:
    assert parse_signal_spec("") == ()
    assert parse_signal_spec("machine, file:/run/pause") == ("machine", "file:/run/pause")
    for bad in ["file:", "cpu", "none,machine"]:
        with pytest.raises(ValueError):
            parse_signal_spec(bad)


def test_the_machine_signal_reads_this_machine() -> None:
    signal = MachineSignal()
    try:
        deadline = time.monotonic() + 5
        readings = signal.read()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            readings = signal.read()
        assert readings.cpu is not None and 0.0 <= readings.cpu <= 100.0
        assert readings.gpu is None  # no NVIDIA driver here: the GPU probe is skipped
        assert readings.input_idle is None or readings.input_idle >= 0
        assert readings.switch is None
    finally:
        signal.close()


def test_an_engines_process_counts_as_the_workers_own(tmp_path: Path) -> None:
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        own = OwnProcesses(psutil, port)
        deadline = time.monotonic() + 10
        while own.unseen_engine and time.monotonic() < deadline:  # until it listens
            time.sleep(0.1)
            own = OwnProcesses(psutil, port)
        assert not own.unseen_engine
        assert {os.getpid(), engine.pid} <= {p.pid for p in own.processes()}
    finally:
        engine.terminate()
        engine.wait(10)
    nobody = OwnProcesses(psutil, free_port())
    assert nobody.unseen_engine  # its load cannot be told from the owner's: CPU and GPU are not read
    assert CpuUse(psutil, nobody).read() is None


def test_i8042_counters(tmp_path: Path) -> None:
    text = (
        "           CPU0       CPU1\n"
        "  1:         10          2   IO-APIC   1-edge      i8042\n"
        " 12:        100         30   IO-APIC  12-edge      i8042\n"
        " 14:          5          0   IO-APIC  14-edge      ata_piix\n"
    )
    assert i8042_interrupts(text) == 142
    assert i8042_interrupts("  0:  3  IO-APIC 2-edge timer\n") is None
    path = tmp_path / "interrupts"
    path.write_text(text)
    now = [100.0]
    probe = InterruptIdle(path, 142, clock=lambda: now[0])
    now[0] = 130.0
    assert probe.read() == 30.0  # unchanged since it started
    path.write_text(text.replace("100", "101"))
    assert probe.read() == 0.0  # a key was pressed
    now[0] = 140.0
    assert probe.read() == 10.0
    assert InterruptIdle.open(tmp_path / "absent") is None


# --- the watch and the hand-back ------------------------------------------------------------


class Script:
    """A signal whose readings the test sets."""

    def __init__(self) -> None:
        self.readings = Readings(switch=False)
        self.closed = False

    def read(self) -> Readings:
        return self.readings

    def close(self) -> None:
        self.closed = True


async def test_the_watch_follows_its_signal() -> None:
    script, now = Script(), [0.0]
    watch = IdleWatch(script, IdlePolicy(after=5), poll=0.01, clock=lambda: now[0], time_of_day=lambda: NOON)
    await watch.start()
    try:
        assert not watch.may_pull()
        script.readings = Readings(switch=True)
        await asyncio.sleep(0.05)
        assert not watch.may_pull()  # not idle for 5 s yet
        now[0] = 5.0
        await asyncio.wait_for(watch.wait_for(idle=True), 2)
        assert watch.may_pull() and watch.state.reasons == ()
        script.readings = Readings(switch=False, note="owner back")
        await asyncio.wait_for(watch.wait_for(idle=False), 2)
        assert not watch.may_pull() and watch.state.reasons == ("owner back",)
    finally:
        await watch.stop()
    assert script.closed


async def test_a_failing_signal_counts_as_busy() -> None:
    class Broken:
        def read(self) -> Readings:
            raise OSError("gone")

        def close(self) -> None:
            return None

    watch = IdleWatch(Broken(), IdlePolicy(after=0), poll=0.01)
    await watch.start()
    try:
        assert not watch.may_pull() and "failed (OSError)" in watch.state.reasons[0]
    finally:
        await watch.stop()


class Jobs:
    """Running jobs as the hand-back sees them: id -> tokens streamed; `stop` ends one."""

    def __init__(self, **tokens: int) -> None:
        self.tokens = dict(tokens)
        self.stopped: list[tuple[str, float]] = []

    def stop(self, job: str) -> None:
        self.stopped.append((job, time.monotonic()))
        self.tokens.pop(job, None)


class Switch:
    def __init__(self, idle: bool = False) -> None:
        self.idle = idle

    def may_pull(self) -> bool:
        return self.idle


async def test_hand_back_returns_unstarted_jobs_at_once_and_stops_the_rest_after_the_grace() -> None:
    jobs = Jobs(fresh=0, streaming=12, finishing=3)
    started = time.monotonic()

    async def finish_soon() -> None:
        await asyncio.sleep(0.1)
        jobs.tokens.pop("finishing")  # it ends by itself within the grace period

    finisher = asyncio.create_task(finish_soon())
    await hand_back(Switch(), lambda: jobs.tokens, jobs.stop, grace=0.5)  # type: ignore[arg-type]
    await finisher
    assert [job for job, _ in jobs.stopped] == ["fresh", "streaming"]
    assert jobs.stopped[0][1] - started < 0.05  # at once
    assert jobs.stopped[1][1] - started >= 0.5  # after the grace
    assert jobs.tokens == {}


async def test_hand_back_stops_waiting_when_the_machine_is_idle_again() -> None:
    jobs, switch = Jobs(streaming=5), Switch()

    async def owner_leaves() -> None:
        await asyncio.sleep(0.1)
        switch.idle = True

    leaving = asyncio.create_task(owner_leaves())
    await asyncio.wait_for(hand_back(switch, lambda: jobs.tokens, jobs.stop, grace=5), 2)  # type: ignore[arg-type]
    await leaving
    assert jobs.stopped == [] and jobs.tokens == {"streaming": 5}


async def test_own_nodes_are_always_available() -> None:
    always = AlwaysAvailable()
    assert always.may_pull()
    await asyncio.wait_for(always.wait_for(idle=True), 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(always.wait_for(idle=False), 0.05)


# --- settings -------------------------------------------------------------------------------


def settings(*args: str) -> WorkerSettings:
    return WorkerSettings.from_args(["--backend", "echo", *args])


def test_which_nodes_watch_the_machine(tmp_path: Path) -> None:
    assert isinstance(availability_for(settings(), CPU_ONLY), AlwaysAvailable)
    assert isinstance(
        availability_for(settings("--kind", "volunteer", "--idle-signal", "none"), CPU_ONLY), AlwaysAvailable
    )
    volunteer = availability_for(settings("--kind", "volunteer"), CPU_ONLY)
    assert isinstance(volunteer, IdleWatch)
    assert volunteer.policy == IdlePolicy(cpu_percent=25, gpu_percent=10, after=180, hours=(), input_minutes=0)
    paused_by_file = availability_for(settings("--idle-signal", f"file:{tmp_path / 'x'}"), CPU_ONLY)
    assert isinstance(paused_by_file, IdleWatch)  # an own node a script can pause


def test_user_input_counts_by_default_on_gpu_and_engine_nodes() -> None:
    gpu = Hardware(cpu="test", cores=8, memory=1 << 34, gpus=(Gpu("NVIDIA Test", 24 << 30),))
    on_gpu = availability_for(settings("--kind", "volunteer", "--idle-hours", "22:00-07:00"), gpu)
    assert isinstance(on_gpu, IdleWatch)
    assert on_gpu.policy.input_minutes == 3 and on_gpu.policy.hours == (HourRange(1320, 420),)
    engine = WorkerSettings.from_args(["--kind", "volunteer", "--engine-url", "http://127.0.0.1:9/v1"])
    on_engine = availability_for(engine, CPU_ONLY)
    assert isinstance(on_engine, IdleWatch) and on_engine.policy.input_minutes == 3
    told = availability_for(settings("--kind", "volunteer", "--idle-input-minutes", "0"), gpu)
    assert isinstance(told, IdleWatch) and told.policy.input_minutes == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--idle-hours", "22:00"],
        ["--idle-signal", "cpu"],
        ["--idle-after", "-1"],
        ["--idle-grace", "-5"],
        ["--idle-poll", "0"],
    ],
)
def test_bad_idle_settings_are_refused(args: list[str]) -> None:
    with pytest.raises(SystemExit):
        settings(*args)


# --- real workers through the stack ---------------------------------------------------------


def volunteer(stack: Stack, node: str, signal_file: Path, **env: str) -> None:
    stack.start_worker(
        TOKENYARD_NODE_ID=node,
        TOKENYARD_KIND="volunteer",
        TOKENYARD_POOL="vol",
        TOKENYARD_IDLE_SIGNAL=f"file:{signal_file}",
        TOKENYARD_IDLE_AFTER="0",
        TOKENYARD_IDLE_POLL="0.1",
        **env,
    )


async def volunteer_client(stack: Stack) -> openai.AsyncOpenAI:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers()) as http:
        r = await http.post("/v1/admin/keys", json={"name": "volunteers welcome", "volunteer_ok": True})
        assert r.status_code == 201, r.text
        key = r.json()["key"]
    return openai.AsyncOpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0, timeout=30)


class Streamed:
    """A streamed request read in the background: its text, how it ended, when it first spoke."""

    def __init__(self, client: openai.AsyncOpenAI, prompt: str) -> None:
        self.error = ""
        self.sse = Sse()
        self.spoke = asyncio.Event()
        self.task = asyncio.create_task(self._read(client, prompt))

    async def _read(self, client: openai.AsyncOpenAI, prompt: str) -> None:
        try:
            stream = await client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": prompt}], stream=True
            )
            await self.sse.drain(stream, until=self._spoken, timeout=120)
        except openai.APIError as e:
            self.error = e.message

    @property
    def text(self) -> str:
        return self.sse.text

    @property
    def finish(self) -> str:
        return self.sse.finish or ""

    def _spoken(self, sse: Sse) -> bool:
        """Marks the first text (and reads on)."""
        if sse.text:
            self.spoke.set()
        return False


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


async def test_volunteers_follow_the_idle_signal_and_hand_work_back(stack: Stack, tmp_path: Path) -> None:
    v_file, w_file = tmp_path / "v-idle", tmp_path / "w-idle"
    v_file.write_text("idle")
    w_file.write_text("busy")
    volunteer(stack, "vol-v", v_file, TOKENYARD_SLOTS="3", TOKENYARD_IDLE_GRACE="4")
    volunteer(stack, "vol-w", w_file, TOKENYARD_SLOTS="4", TOKENYARD_IDLE_GRACE="4")
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    adverts = await watch_adverts(stack)
    await until(lambda: {"vol-v", "vol-w"} <= adverts.latest.keys(), 5, "both volunteers advertise")
    assert adverts.latest["vol-w"].paused and adverts.latest["vol-w"].draining  # busy: it takes nothing
    assert not adverts.latest["vol-v"].paused and not adverts.latest["vol-v"].draining

    def served(node: str) -> int:
        return adverts.latest[node].served.requests

    client = await volunteer_client(stack)
    async with client:
        # idle: it pulls and serves
        r = await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "hello idle"}])
        assert r.choices[0].message.content.startswith("hello idle hello idle")
        await until(lambda: served("vol-v") == 1, 5, "vol-v served the first request")

        # three jobs fill vol-v: two streaming, one that has not streamed yet
        long = Streamed(client, "long [[tokens=80]] [[rate=10]]")  # 8 s: longer than the grace
        short = Streamed(client, "short [[tokens=12]] [[rate=5]]")  # 2.4 s: done within the grace
        fresh = asyncio.create_task(
            client.chat.completions.create(
                model=ECHO, messages=[{"role": "user", "content": "handed back [[tokens=3]] [[delay=5]]"}]
            )
        )
        await asyncio.wait_for(asyncio.gather(long.spoke.wait(), short.spoke.wait()), 10)
        await until(lambda: adverts.latest["vol-v"].slots_free == 0, 5, "vol-v runs three jobs")

        # vol-w's machine goes idle (it takes nothing yet: nothing is queued), then vol-v's owner is back
        w_file.write_text("idle")
        await until(lambda: not adverts.latest["vol-w"].paused, 3, "vol-w takes work")
        v_file.write_text("busy")
        flipped = time.monotonic()
        await until(lambda: adverts.latest["vol-v"].paused, 3, "vol-v advertises itself paused")
        assert adverts.latest["vol-v"].draining

        handed = await asyncio.wait_for(fresh, 20)  # no token yet when the owner came back: moved
        assert handed.choices[0].message.content == "handed back handed"
        assert handed.choices[0].finish_reason == "stop"
        await asyncio.wait_for(short.task, 10)
        assert short.error == "" and short.finish == "stop"  # finished within the grace period
        assert short.text == " ".join(["short"] * 12)

        # vol-v has free slots now but pulls nothing: new jobs go to vol-w
        later = await asyncio.gather(
            *(
                client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": f"later {i}"}])
                for i in range(3)
            )
        )
        assert [r.choices[0].message.content.split()[:2] for r in later] == [["later", str(i)] for i in range(3)]

        # stopped on vol-v after the grace, it is continued on vol-w from the text the client has
        # (continuation is the default where the next route takes an assistant prefix): one
        # uninterrupted answer
        await asyncio.wait_for(long.task, 20)
        assert long.error == "" and long.finish == "stop", long.error
        assert long.text == " ".join(["long"] * 80) and time.monotonic() - flipped < 20
        await until(lambda: served("vol-v") == 2 and served("vol-w") == 5, 5, "served counts settle")

        # vol-v's machine idle again, vol-w's owner back: vol-v serves again
        v_file.write_text("idle")
        w_file.write_text("busy")
        await until(lambda: not adverts.latest["vol-v"].paused and adverts.latest["vol-w"].paused, 3, "flipped back")
        again = await client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "back again"}])
        assert again.choices[0].message.content.startswith("back again")
        await until(lambda: served("vol-v") == 3, 5, "vol-v served again")
    assert served("vol-w") == 5  # the handed-back job, the continuation and the three later ones


async def test_a_volunteer_watching_the_machine_starts_paused(stack: Stack) -> None:
    stack.start_worker(TOKENYARD_NODE_ID="vol-m", TOKENYARD_KIND="volunteer", TOKENYARD_IDLE_AFTER="600")
    adverts = await watch_adverts(stack)
    await until(lambda: "vol-m" in adverts.latest, 15, "the volunteer advertises")
    advert = adverts.latest["vol-m"]
    assert advert.kind == "volunteer" and advert.paused and advert.draining  # idle for 10 minutes first
    assert advert.hardware is not None and advert.hardware.cores == os.cpu_count()
