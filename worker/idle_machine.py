"""The machine's own idle signals: other programs' CPU use, other processes' GPU use, and how long
ago the user last touched the keyboard or mouse. The policy over them is `worker.idle`'s.

Each probe reports what it can see or None, and a probe the OS does not offer is simply not
used: there is no GPU use without NVML (`nvidia-ml-py` and NVIDIA's driver), no input time on a
headless server. "Other" means everything but this worker's own process tree and, for a worker
fronting its own engine (`--engine-url`), the engine's process (found by the port it listens
on). When that process cannot be found (it runs as another user, say), its load cannot be told
from the owner's, so CPU and GPU use are not read at all, and user input decides.

User input, per OS: on Linux the X11 screensaver extension's idle time (a desktop session with
`DISPLAY`), the PS/2 keyboard and touchpad interrupt counters (`i8042` in /proc/interrupts) and
the last keystroke on any logged-in terminal (its device's access time, as `w` reports); on
macOS `ioreg`'s HIDIdleTime; on Windows `GetLastInputInfo` (which sees the worker's own session:
run it in the user's session, not as a service, for this signal).

Everything here blocks briefly (reads /proc, may run `ioreg`): it runs off the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from worker.idle import Readings

log = structlog.get_logger(__name__)

CPU_WINDOW = 5.0  # seconds of CPU samples averaged: a click that opens a tab is not the owner back
PROBE_TIMEOUT = 2.0  # seconds `ioreg` may take
ENGINE_LOOK_EVERY = 30.0  # seconds between searches for an engine process not found (a scan of /proc)


class IdleSetupError(RuntimeError):
    """Idle-time mode cannot watch this machine (psutil is missing)."""


class Probe(Protocol):
    def read(self) -> float | None: ...


class MachineSignal:
    """Every probe this machine offers, as one `worker.idle.IdleSignal`."""

    def __init__(self, *, engine_port: int | None = None, want_input: bool = True) -> None:
        try:
            import psutil
        except ImportError as e:
            raise IdleSetupError("idle-time mode needs psutil: pip install 'tokenyard[worker]'") from e
        self._own = OwnProcesses(psutil, engine_port)
        self._cpu = CpuUse(psutil, self._own)
        self._gpu = NvmlUse.open(self._own)
        self._input: Probe = InputIdle.for_this_os(psutil) if want_input else _Nothing()

    def read(self) -> Readings:
        return Readings(cpu=self._cpu.read(), gpu=self._gpu.read(), input_idle=self._input.read())

    def close(self) -> None:
        self._gpu.close()


class _Nothing:
    def read(self) -> float | None:
        return None

    def close(self) -> None:
        return None


class OwnProcesses:
    """This worker's process tree, and its engine's when it fronts one and the engine is found."""

    def __init__(self, psutil: Any, engine_port: int | None) -> None:
        self._psutil = psutil
        self._engine_port = engine_port
        self._engine: Any = None
        self._next_look = 0.0
        self._told_unseen = False

    @property
    def unseen_engine(self) -> bool:
        """It fronts an engine whose process cannot be found (so its load looks like others')."""
        if self._engine_port is None:
            return False
        if self._engine is not None:
            if self._engine.is_running():
                return False
            self._engine, self._next_look = None, 0.0  # it went away: look for its successor now
        now = time.monotonic()
        if now >= self._next_look:  # an engine restarted, or started after the worker: look again
            self._next_look = now + ENGINE_LOOK_EVERY
            self._engine = self._find_engine(self._engine_port)
        if self._engine is None and not self._told_unseen:
            self._told_unseen = True
            log.warning(
                "idle.engine_unseen",
                port=self._engine_port,
                effect="other programs' CPU and GPU use cannot be told from the engine's; they are not read",
            )
        return self._engine is None

    def processes(self) -> list[Any]:
        roots = [self._psutil.Process(os.getpid())]
        if self._engine is not None:
            roots.append(self._engine)
        found: dict[int, Any] = {}
        for root in roots:
            with contextlib.suppress(self._psutil.Error):
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
        return list(found.values())

    def _find_engine(self, port: int) -> Any:
        try:
            connections = self._psutil.net_connections(kind="tcp")
        except (self._psutil.Error, OSError):  # AccessDenied on macOS without root
            return None
        for c in connections:
            if c.status == self._psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                with contextlib.suppress(self._psutil.Error):
                    return self._psutil.Process(c.pid)
        return None


class CpuUse:
    """Other programs' CPU use in percent of the whole machine, averaged over CPU_WINDOW."""

    def __init__(self, psutil: Any, own: OwnProcesses, clock: Callable[[], float] = time.monotonic) -> None:
        self._psutil = psutil
        self._own = own
        self._clock = clock
        self._cpus = psutil.cpu_count() or 1
        self._tracked: dict[int, Any] = {}  # pid -> Process: cpu_percent measures since its last call
        self._samples: deque[tuple[float, float]] = deque()
        psutil.cpu_percent(None)  # the first call only sets the baseline

    def read(self) -> float | None:
        if self._own.unseen_engine:
            return None
        machine = float(self._psutil.cpu_percent(None))
        ours = 0.0
        alive: dict[int, Any] = {}
        for p in self._own.processes():
            tracked = self._tracked.get(p.pid, p)
            with contextlib.suppress(self._psutil.Error):
                ours += tracked.cpu_percent(None)  # percent of one CPU; 0 on the first call
                alive[p.pid] = tracked
        self._tracked = alive
        now = self._clock()
        self._samples.append((now, max(0.0, machine - ours / self._cpus)))
        while self._samples and self._samples[0][0] < now - CPU_WINDOW:
            self._samples.popleft()
        return sum(v for _, v in self._samples) / len(self._samples)


class NvmlUse:
    """Other processes' use of the busiest NVIDIA GPU, in percent, through NVML."""

    def __init__(self, pynvml: Any, handles: list[Any], own: OwnProcesses) -> None:
        self._nvml = pynvml
        self._handles = handles
        self._own = own
        self._since = int((time.time() - CPU_WINDOW) * 1e6)  # NVML's sample timestamps: microseconds

    @classmethod
    def open(cls, own: OwnProcesses) -> NvmlUse | _Nothing:
        """NVML's view of the GPUs, or a probe that sees nothing where there is no NVML."""
        try:
            import pynvml
        except ImportError:
            return _Nothing()
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError:  # no driver library, or no device
            return _Nothing()
        if not handles:
            pynvml.nvmlShutdown()
            return _Nothing()
        return cls(pynvml, handles, own)

    def read(self) -> float | None:
        if self._own.unseen_engine:
            return None
        ours = {p.pid for p in self._own.processes()}
        since, self._since = self._since, int(time.time() * 1e6)
        uses = [u for u in (self._device(h, ours, since) for h in self._handles) if u is not None]
        return max(uses) if uses else None

    def _device(self, handle: Any, ours: set[int], since: int) -> float | None:
        nvml = self._nvml
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, since)
        except nvml.NVMLError_NotFound:  # no process used this GPU since the last read
            return 0.0
        except nvml.NVMLError:  # not supported here: the device's total, if none of it is ours
            return self._device_total(handle, ours)
        by_pid: dict[int, int] = {}
        for s in samples:
            by_pid[s.pid] = max(by_pid.get(s.pid, 0), int(s.smUtil))
        return float(min(100, sum(u for pid, u in by_pid.items() if pid not in ours)))

    def _device_total(self, handle: Any, ours: set[int]) -> float | None:
        nvml = self._nvml
        try:
            running = [
                *nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                *nvml.nvmlDeviceGetGraphicsRunningProcesses(handle),
            ]
            if any(p.pid in ours for p in running):
                return None  # our work is on it too, and NVML cannot split the total
            return float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:
            return None

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


class InputIdle:
    """Seconds since the last user input: the least of what every probe this OS offers says."""

    def __init__(self, probes: list[Probe]) -> None:
        self._probes = probes

    @classmethod
    def for_this_os(cls, psutil: Any) -> InputIdle:
        probes: list[Probe] = []
        if sys.platform.startswith("linux"):
            probes = [p for p in (X11Idle.open(), InterruptIdle.open(), TerminalIdle(psutil)) if p is not None]
        elif sys.platform == "darwin":
            probes = [HidIdle()]
        elif sys.platform == "win32":
            probes = [WindowsIdle()]
        return cls(probes)

    def read(self) -> float | None:
        seen = [v for v in (p.read() for p in self._probes) if v is not None]
        return min(seen) if seen else None


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [
        ("window", ctypes.c_ulong),
        ("state", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong),
        ("idle", ctypes.c_ulong),  # milliseconds since the last input
        ("event_mask", ctypes.c_ulong),
    ]


class X11Idle:
    """The X server's idle time (XScreenSaverQueryInfo), for a worker inside a desktop session."""

    def __init__(self, xlib: Any, xss: Any, display: int) -> None:
        self._xlib, self._xss, self._display = xlib, xss, display
        self._info = xss.XScreenSaverAllocInfo()

    @classmethod
    def open(cls) -> X11Idle | None:
        if not os.environ.get("DISPLAY"):
            return None
        x11, xss_name = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
        if not x11 or not xss_name:
            return None
        try:
            xlib, xss = ctypes.CDLL(x11), ctypes.CDLL(xss_name)
        except OSError:
            return None
        xlib.XOpenDisplay.restype = ctypes.c_void_p
        xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
        xlib.XDefaultRootWindow.restype = ctypes.c_ulong
        xlib.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
        xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(_XScreenSaverInfo)]
        display = xlib.XOpenDisplay(None)
        return cls(xlib, xss, display) if display else None

    def read(self) -> float | None:
        root = self._xlib.XDefaultRootWindow(self._display)
        if not self._xss.XScreenSaverQueryInfo(self._display, root, self._info):
            return None
        return float(self._info.contents.idle) / 1000.0


class InterruptIdle:
    """PS/2 keyboard and touchpad interrupts (`i8042` in /proc/interrupts): input happened when
    their count moved. Until it first moves, the worker's start counts as the last input."""

    def __init__(self, path: Path, count: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._count = count
        self._clock = clock
        self._last = clock()

    @classmethod
    def open(cls, path: Path = Path("/proc/interrupts")) -> InterruptIdle | None:
        count = _i8042_count(path)
        return None if count is None else cls(path, count)

    def read(self) -> float | None:
        count = _i8042_count(self._path)
        if count is None:
            return None
        now = self._clock()
        if count != self._count:
            self._count, self._last = count, now
        return now - self._last


def _i8042_count(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return i8042_interrupts(text)


def i8042_interrupts(text: str) -> int | None:
    """The sum of the per-CPU counts of every `i8042` line of a /proc/interrupts text."""
    total, seen = 0, False
    for line in text.splitlines():
        if "i8042" not in line:
            continue
        seen = True
        for field in line.split(":", 1)[-1].split():
            if not field.isdigit():
                break
            total += int(field)
    return total if seen else None


class TerminalIdle:
    """The last keystroke on any logged-in terminal: its device's access time, as `w` shows."""

    def __init__(self, psutil: Any) -> None:
        self._psutil = psutil

    def read(self) -> float | None:
        try:
            terminals = {u.terminal for u in self._psutil.users() if u.terminal}
        except (self._psutil.Error, OSError):
            return None
        latest = 0.0
        for terminal in terminals:
            with contextlib.suppress(OSError):
                latest = max(latest, os.stat(f"/dev/{terminal}").st_atime)
        return max(0.0, time.time() - latest) if latest else None


_HID_IDLE = re.compile(rb'"HIDIdleTime"\s*=\s*(\d+)')


class HidIdle:
    """macOS: `ioreg`'s HIDIdleTime (nanoseconds since the last keyboard, mouse or trackpad input)."""

    def read(self) -> float | None:
        try:
            done = subprocess.run(
                ["ioreg", "-c", "IOHIDSystem", "-d", "4"], capture_output=True, timeout=PROBE_TIMEOUT, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        found = _HID_IDLE.search(done.stdout)
        return int(found.group(1)) / 1e9 if found else None


class _LastInputInfo(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint), ("time", ctypes.c_uint)]


class WindowsIdle:
    """Windows: GetLastInputInfo (milliseconds of the tick count at the session's last input)."""

    def read(self) -> float | None:
        windll = getattr(ctypes, "windll", None)
        if windll is None:
            return None
        info = _LastInputInfo()
        info.size = ctypes.sizeof(info)
        if not windll.user32.GetLastInputInfo(ctypes.byref(info)):
            return None
        return ((windll.kernel32.GetTickCount() - info.time) & 0xFFFFFFFF) / 1000.0
