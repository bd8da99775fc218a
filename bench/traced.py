"""Run a Tokenyard role with tracemalloc on, for finding what its memory grows with.

    python -m bench.traced scheduler [args...]     # as `python -m scheduler [args...]`

On SIGUSR1 the process writes a tracemalloc snapshot into `$TOKENYARD_TRACE_DIR`
(`000.snap`, `001.snap`, ...); `growth(first, last)` ranks what grew between two of them.
`bench/peers.py --soak N --trace-memory scheduler` signals after every block and prints the top
of the difference between the first block's snapshot and the last. tracemalloc slows the
process down (two to three times here), so its requests/s in such a run mean nothing; its RSS
includes tracemalloc's own tables too: read the sizes from the snapshots.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 12  # frames kept per allocation: enough to see which Tokenyard function holds it


def main() -> None:
    module, *args = sys.argv[1:]
    out = Path(os.environ["TOKENYARD_TRACE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(FRAMES)

    def dump(signum: int, frame: FrameType | None) -> None:
        n = len(list(out.glob("*.snap")))
        tmp = out / f"{n:03d}.part"
        tracemalloc.take_snapshot().dump(str(tmp))
        tmp.rename(out / f"{n:03d}.snap")  # complete before it is read

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def growth(first: Path, last: Path, *, top: int = 15) -> list[str]:
    """What grew most from `first` to `last`, by the allocating stack (innermost Tokenyard
    frame first), one line each."""
    ignore = (
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    )
    a = tracemalloc.Snapshot.load(str(first)).filter_traces(ignore)
    b = tracemalloc.Snapshot.load(str(last)).filter_traces(ignore)
    lines = []
    total = sum(s.size for s in b.statistics("filename")) - sum(s.size for s in a.statistics("filename"))
    lines.append(f"traced memory {total / 1e6:+.2f} MB from {first.name} to {last.name}")
    for stat in b.compare_to(a, "traceback")[:top]:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback]
        ours = [f for f, raw in zip(frames, stat.traceback, strict=True) if "/site-packages/" not in raw.filename]
        where = " < ".join((ours or frames)[-4:][::-1])
        lines.append(f"{stat.size_diff / 1e3:+9.1f} KB {stat.count_diff:+7d} blocks  {where}")
    return lines


if __name__ == "__main__":
    main()
