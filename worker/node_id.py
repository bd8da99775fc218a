"""A node's stable id: made once, kept in `<data dir>/node_id`, reused on every later start.

A restarted machine is the same node (its audit trail, registry entry and enrolment stay
one), so the default id is read from the data dir, and made there (host name and a random
suffix) on the first start. `tokenyard worker join` stores the id its enrolment gave in the
same file. `--node-id` overrides it and leaves the file alone.

Two workers started with the same data dir must not share the id (the fleet would see one
node twice), so the worker holding the id keeps an advisory lock on `node_id.lock` while it
runs; a second one gets a fresh id for that run, says so, and stores nothing. The lock is the
OS's (`flock`), released when the process ends however it ends; where there is none
(Windows), the id is shared and the warning is the user's to heed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)

FILE = "node_id"
LOCK = "node_id.lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def fresh_node_id() -> str:
    """`<host>-<8 hex digits>`, the host name reduced to letters, digits and `-`."""
    host = _UNSAFE.sub("-", socket.gethostname())[:40].strip("-") or "node"
    return f"{host}-{uuid.uuid4().hex[:8]}"


def valid_node_id(node_id: str) -> bool:
    return bool(node_id) and len(node_id) <= 64 and not _UNSAFE.search(node_id)


@contextlib.contextmanager
def stable_node_id(data_dir: str | Path) -> Iterator[str]:
    """The data dir's node id (made and stored on first use), held for the `with` block."""
    root = Path(data_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as lock:
        if not _try_lock(lock):
            node_id = fresh_node_id()
            log.warning(
                "worker.node_id_in_use",
                data_dir=str(root),
                node_id=node_id,
                hint="another worker runs with this data dir; give each worker its own --data-dir or --node-id",
            )
            yield node_id
            return
        yield _read_or_make(root / FILE)


def _read_or_make(path: Path) -> str:
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        stored = ""
    if stored:
        if not valid_node_id(stored):
            raise SystemExit(
                f"tokenyard worker: {path} holds {stored[:80]!r}, not a node id (letters, digits and '-'); "
                "fix or remove it, or pass --node-id"
            )
        return stored
    node_id = fresh_node_id()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(node_id + "\n", encoding="utf-8")
    os.replace(tmp, path)  # whole or not at all, even if the machine stops right here
    log.info("worker.node_id_created", node_id=node_id, path=str(path))
    return node_id


def _try_lock(lock: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; see the module docstring
        return True
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
