"""A worker's heartbeat to one gateway, for every attempt of that gateway's jobs it runs.

    worker --Beat (request, subjects.reply_beat(gateway))--> gateway
    worker <--BeatAnswer: which of the beat's attempts must stop-- gateway

One message per (worker, gateway) and interval, not one request per running job: at 3,800 open
streams the per-job requests were half of a worker's CPU (bench/RESULTS.md, section 8). Each
entry names its attempt by the job's reply token (the secret only its `Job.reply` carries, so a
node that knows another job's id cannot keep that job's attempt alive), its attempt id and the
sequence number its next event will carry (as `schemas.events.Heartbeat` does: a lost event
shows as a gap even when nothing follows it). The answer lists the positions, in the beat, of
the attempts that must stop; an empty answer means every one goes on.

A beat travels on its gateway's event inbox, so it reaches the gateway in order with the
attempts' events (one publisher, one subscription). A worker with many attempts for one gateway
sends them in several beats of at most `BEAT_ENTRIES` each, each well inside a NATS message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.codec import WireError, need, pack, unpack

BEAT_ENTRIES = 2000  # attempts per beat: ~100 KB, a tenth of NATS's default message limit


@dataclass(frozen=True, slots=True)
class Beating:
    """One attempt in a beat: its job's reply token, its attempt id, its next sequence number."""

    token: str
    attempt: int
    seq: int


@dataclass(frozen=True, slots=True)
class Beat:
    """Worker -> gateway: `node` still runs these attempts of the gateway's jobs."""

    node: str
    attempts: tuple[Beating, ...]

    def encode(self) -> bytes:
        return pack({"n": self.node, "b": [[b.token, b.attempt, b.seq] for b in self.attempts]})

    @classmethod
    def decode(cls, data: bytes) -> Beat:
        o = unpack(data)
        node, entries = need(o, "n"), need(o, "b")
        if not isinstance(node, str) or not isinstance(entries, list):
            raise WireError("a beat is a node and a list of attempts")
        return cls(node, tuple(_beating(e) for e in entries))


@dataclass(frozen=True, slots=True)
class BeatAnswer:
    """Gateway -> worker: the positions in the beat of the attempts that must stop."""

    stop: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return pack({"stop": list(self.stop)})

    @classmethod
    def decode(cls, data: bytes) -> BeatAnswer:
        stop = need(unpack(data), "stop")
        if not isinstance(stop, list) or not all(_is_int(i) for i in stop):
            raise WireError("a beat answer's stops are positions")
        return cls(tuple(stop))


def _beating(entry: Any) -> Beating:
    if not isinstance(entry, list) or len(entry) != 3:
        raise WireError("a beat entry is [token, attempt, seq]")
    token, attempt, seq = entry
    if not isinstance(token, str) or not _is_int(attempt) or not _is_int(seq):
        raise WireError("a beat entry is [token, attempt, seq]")
    return Beating(token, attempt, seq)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
