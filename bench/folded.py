"""Summaries of py-spy's raw folded stacks (`frame;frame;... count` per line): where a process's
samples go, by the innermost frame (self time), by function anywhere on the stack (inclusive
time), and by area (the library or the part of Tokenyard a frame's file belongs to).

    python bench/folded.py PROFILE_DIR/plain-32/api.folded [--top 15]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

# The first area whose pattern is found in "/" + a frame's file wins (py-spy names files relative
# to their sys.path entry: `nats/aio/client.py`, `broker_api/chat.py`, `asyncio/streams.py`).
AREAS = (
    ("nats client", "/nats/"),
    ("httpx/httpcore", "/httpx/"),
    ("httpx/httpcore", "/httpcore/"),
    ("h11", "/h11/"),
    ("uvicorn", "/uvicorn/"),
    ("starlette", "/starlette/"),
    ("fastapi", "/fastapi/"),
    ("pydantic", "/pydantic"),
    ("structlog", "/structlog/"),
    ("msgpack", "/msgpack/"),
    ("json", "/json/"),
    ("sqlite", "/aiosqlite/"),
    ("sqlite", "/sqlite3/"),
    ("anyio", "/anyio/"),
    ("asyncio", "/asyncio/"),
    ("socket", "/socket.py"),
    ("tokenyard broker_api", "/broker_api/"),
    ("tokenyard scheduler", "/scheduler/"),
    ("tokenyard worker", "/worker/"),
    ("tokenyard schemas", "/schemas/"),
)
OWN = ("/broker_api/", "/scheduler/", "/worker/", "/schemas/")
# Samples whose innermost frame is the loop's runner are inside the event loop's native code
# (uvloop: polling, socket reads and writes, callbacks written in C).
LOOP = ("Runner.run", "asyncio/runners.py")


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame, outermost first."""
    out = []
    for raw in stack.split(";"):
        m = _FRAME.match(raw)
        out.append((m.group("func"), m.group("file")) if m else (raw, ""))
    return out


def area(func: str, file: str) -> str:
    if (func, file) == LOOP:
        return "event loop (native)"
    for name, pattern in AREAS:
        if pattern in "/" + file:
            return name
    return "other"


def _own(func: str, file: str) -> bool:
    """A frame of Tokenyard's own code, not an entry point (on every stack)."""
    path = "/" + file
    entry = path.endswith(("/main.py", "/__main__.py")) or (func, file) == ("run", "schemas/logs.py")
    return any(p in path for p in OWN) and not entry


def read(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((frames(stack), int(count)))
    return out


def short(func: str, file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/bench/", "/wt/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{func} ({file})"


def summarize(path: Path, top: int = 12) -> dict:
    """Total samples; the top innermost frames (self), Tokenyard's own functions anywhere on the
    stack (inclusive; entry points left out) and areas (by innermost
    frame), as (share of samples in %, name)."""
    stacks = read(path)
    total = sum(n for _, n in stacks) or 1
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for fs, n in stacks:
        if not fs:
            continue
        self_time[short(*fs[-1])] += n
        for name in {short(*f) for f in fs if _own(*f)}:
            inclusive[name] += n
        areas[area(*fs[-1])] += n

    def ranked(c: Counter[str]) -> list[tuple[float, str]]:
        return [(round(100 * v / total, 1), k) for k, v in c.most_common(top)]

    return {"samples": total, "self": ranked(self_time), "inclusive": ranked(inclusive), "areas": ranked(areas)}


def render(name: str, s: dict) -> str:
    lines = [f"## {name}: {s['samples']} samples"]
    lines.append("  areas (innermost known frame): " + ", ".join(f"{a} {p}%" for p, a in s["areas"]))
    lines.append("  self:")
    lines += [f"    {p:5.1f}%  {f}" for p, f in s["self"]]
    lines.append("  inclusive:")
    lines += [f"    {p:5.1f}%  {f}" for p, f in s["inclusive"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    for f in a.files:
        print(render(str(f), summarize(f, a.top)))


if __name__ == "__main__":
    main()
