"""A child's tie to the launcher that started it: when `tokenyard up` dies, its children follow.

A launcher killed with SIGKILL (an OOM kill, a closed terminal) runs no clean-up, so its
children (nats-server, the scheduler, the API, the worker) would run on holding their ports
and the next `up` could not start. Two ties, both set up before the child runs anything:

- the lifeline pipe, everywhere: the launcher keeps the write end of a pipe and never writes;
  each child holds the read end, and reading it returns end-of-file the moment the launcher is
  gone, however it died. A thread in the child waits for that, then sends the child SIGTERM
  (its own clean shutdown) and, if it is still alive GRACE seconds later, ends it;
- `prctl(PR_SET_PDEATHSIG, SIGTERM)` on Linux, which the kernel fires itself.

A Python role runs inside the wrapper: `python -m broker_api.lifeline --fd N --parent PID -m
scheduler ...` sets both ties and then runs the role's module as `python -m` would, in the same
process. A process that cannot watch a pipe itself (nats-server) gets a guard process instead:
`... --guard PID` waits on the pipe and ends that PID.

`Lifeline` is the launcher's side: the pipe, and the command lines that tie a child to it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import runpy
import signal
import sys
import threading
import time

GRACE = 10.0  # seconds a child may take to stop after SIGTERM before it is ended
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Lifeline:
    """The launcher's end: a pipe it holds open for as long as it lives."""

    def __init__(self) -> None:
        self.fd, self._keep = os.pipe()  # both not inherited (PEP 446); children get `fd` by pass_fds
        self.parent = os.getpid()

    def command(self, module: str, args: list[str]) -> list[str]:
        """How to run `python -m module args` tied to this launcher (pass `fd` in pass_fds)."""
        return [sys.executable, "-m", "broker_api.lifeline", *self._tie(), "-m", module, *args]

    def guard(self, pid: int) -> list[str]:
        """How to run a guard that ends `pid` when this launcher is gone."""
        return [sys.executable, "-m", "broker_api.lifeline", *self._tie(), "--guard", str(pid)]

    def _tie(self) -> list[str]:
        return ["--fd", str(self.fd), "--parent", str(self.parent)]


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def wait_for_eof(fd: int) -> None:
    """Block until the pipe's write end is closed everywhere (the launcher is gone)."""
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass


def _end(pid: int) -> None:
    """SIGTERM `pid`, and SIGKILL it if it is still there after GRACE seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def _watch(fd: int) -> None:
    wait_for_eof(fd)
    _end(os.getpid())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, module, rest = argv, "", []
    if "-m" in argv:  # what follows `-m MODULE` is the module's own (argparse would read it)
        at = argv.index("-m")
        own, module, rest = argv[:at], argv[at + 1] if at + 1 < len(argv) else "", argv[at + 2 :]
    p = argparse.ArgumentParser(prog="python -m broker_api.lifeline", allow_abbrev=False)
    p.add_argument("--fd", type=int, required=True, help="the read end of the launcher's lifeline pipe")
    p.add_argument("--parent", type=int, required=True, help="the launcher's PID")
    p.add_argument("--guard", type=int, help="end this PID when the launcher is gone (instead of -m MODULE ...)")
    a = p.parse_args(own)
    if (a.guard is None) == (not module):
        p.error("give either -m MODULE [ARGS...] or --guard PID")
    if a.guard is not None:
        # Only the launcher's end may end a guard: not the terminal's hang-up or Ctrl-C, which
        # may reach it first (nats-server runs in a session of its own and would be left).
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        wait_for_eof(a.fd)
        _end(a.guard)
        return
    die_with_parent()
    if os.getppid() != a.parent:  # the launcher died before the tie was set: follow it now
        raise SystemExit(1)
    threading.Thread(target=_watch, args=(a.fd,), name="lifeline", daemon=True).start()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
