"""One attempt's outgoing event stream: sequence numbers, coalescing, final events.

Token deltas that arrive within `coalesce` seconds of the last message sent are merged and
sent together (one NATS message per batch); the first delta and every final event go at
once. Sequence numbers are assigned at the moment a message is handed to the client, and
nats-py appends to its outgoing buffer without awaiting first, so messages leave in
sequence order whichever task sends them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from schemas.errors import TokenyardError
from schemas.events import Piece
from schemas.jobs import DELTA, DONE, ERROR, HEARTBEAT, START, Event
from worker.backend import Usage


class Publisher(Protocol):
    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None: ...


class EventStream:
    def __init__(self, nc: Publisher, subject: str, *, job_id: str, attempt: int, node: str, coalesce: float) -> None:
        self._nc = nc
        self._subject = subject
        self._job_id = job_id
        self._attempt = attempt
        self._node = node
        self._coalesce = coalesce
        self._seq = 0
        self._pending: list[list[Any]] = []  # [index, text, tokens], merged per index run
        self._last_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._start_timer: asyncio.TimerHandle | None = None
        self.tokens_sent = 0

    @property
    def tokens(self) -> int:
        """Every token handed to this stream: sent, or waiting to go with the next message."""
        return self.tokens_sent + sum(int(p[2]) for p in self._pending)

    def _event(self, kind: str, **fields: Any) -> Event:
        self.cancel_start()
        ev = Event(kind, self._job_id, self._attempt, self._seq, self._node, **fields)
        self._seq += 1
        return ev

    async def _send(self, ev: Event) -> None:
        self._last_sent = time.monotonic()
        await self._nc.publish(self._subject, ev.encode())

    def start(self, delay: float) -> None:
        """Tell the gateway the attempt began, unless another event does it first: a job whose
        first token comes within `delay` needs no START message at all (the gateway adopts an
        attempt by its sequence 0, whatever its kind)."""
        self._start_timer = asyncio.get_running_loop().call_later(delay, self._start_now)

    def _start_now(self) -> None:
        self._start_timer = None
        if self._seq == 0:
            asyncio.ensure_future(self._send(self._event(START)))

    def cancel_start(self) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None

    async def add(self, delta: Piece) -> None:
        if self._pending and self._pending[-1][0] == delta.index:
            self._pending[-1][1] += delta.text
            self._pending[-1][2] += delta.tokens
        else:
            self._pending.append([delta.index, delta.text, delta.tokens])
        waited = time.monotonic() - self._last_sent
        if waited >= self._coalesce:
            await self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._coalesce - waited, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        if self._pending:
            asyncio.ensure_future(self.flush())

    def _take_pieces(self) -> tuple[tuple[int, str, int], ...]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pieces = tuple((int(i), str(t), int(n)) for i, t, n in self._pending)
        self._pending = []
        self.tokens_sent += sum(p[2] for p in pieces)
        return pieces

    async def flush(self) -> None:
        pieces = self._take_pieces()
        if pieces:
            await self._send(self._event(DELTA, pieces=pieces))

    async def done(self, finish: list[str], usage: Usage) -> None:
        """The last text (if any) travels with the done event: one message fewer."""
        pieces = self._take_pieces()
        await self._send(
            self._event(
                DONE,
                pieces=pieces,
                finish=tuple(finish),
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                cost=usage.cost,
            )
        )

    async def fail(self, error: TokenyardError, *, retryable: bool) -> None:
        await self.flush()
        await self._send(self._event(ERROR, error=error.to_wire(), retryable=retryable))

    def heartbeat(self) -> bytes:
        """A heartbeat carries the next sequence number, so the gateway can tell a lost message
        (its expected sequence is behind) from a quiet one. It is not itself in the sequence."""
        return Event(HEARTBEAT, self._job_id, self._attempt, self._seq, self._node).encode()
