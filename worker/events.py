"""One attempt's outgoing event stream: sequence numbers, coalescing, final events.

Token deltas that arrive within `coalesce` seconds of the last message sent are merged and
sent together (one NATS message per batch); every final event goes at once, and so does the
first delta of a streamed answer (its client is waiting for it). A plain answer's window opens
when the attempt starts, so a short answer's text rides with DONE: one message instead of two.
A batch that grows past `BATCH_BYTES` (an embedding job's vectors) goes at once too, so no
message nears NATS's 1 MiB payload limit. Sequence numbers are assigned at the moment a
message is handed to the client (never earlier, in another task), and nats-py appends to its
outgoing buffer without awaiting first, so messages leave in sequence order whichever task
sends them.

The final DONE goes as a request: the gateway answers it, so the worker learns whether any
gateway heard the end of the job (no answer: the worker reports the job itself, see
`worker.runtime` and `schemas.usage.WorkerReport`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors

from schemas.errors import TokenyardError
from schemas.events import (
    Delta,
    Done,
    Failed,
    FinishReason,
    Heartbeat,
    Piece,
    Start,
    TokenLogprob,
    ToolCallDelta,
)
from worker.backend import Usage

BATCH_BYTES = 256 * 1024  # roughly: what a delta's pieces hold before it is sent without waiting


class Publisher(Protocol):
    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None: ...

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 1.0) -> Any: ...


@dataclass(slots=True)
class _Run:
    """Consecutive pieces of one choice waiting to be sent, merged: text joined, tool-call
    fragments and logprobs kept in order."""

    index: int
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    embedding: bytes = b""

    def add(self, piece: Piece) -> None:
        if piece.embedding:  # one vector per input: a run holds one, never merged
            self.embedding = piece.embedding
        if piece.text:
            self.text.append(piece.text)
        self.tokens += piece.tokens
        self.tool_calls.extend(piece.tool_calls)
        self.logprobs.extend(piece.text_logprobs)  # merged with text, a call's would read as the text's

    def hides(self, piece: Piece) -> bool:
        """Merged, would `piece` and this run make call fragments without text beside text
        logprobs (a piece of no text carries those: a stop sequence's tokens), which would then
        read as the call's?"""
        calls, text = self.tool_calls or piece.tool_calls, self.text or piece.text
        return bool(calls and not text and (self.logprobs or piece.text_logprobs))

    def piece(self) -> Piece:
        return Piece(
            self.index, "".join(self.text), self.tokens, tuple(self.tool_calls), tuple(self.logprobs), self.embedding
        )


class EventStream:
    def __init__(
        self,
        nc: Publisher,
        subject: str,
        *,
        job_id: str,
        attempt: int,
        node: str,
        coalesce: float,
        proof: bytes = b"",
        first_at_once: bool = True,
    ) -> None:
        """`proof`: the node's signature of this attempt's claim (`worker.identity`), sent on its
        first event, whatever its kind."""
        self._nc = nc
        self._proof = proof
        self._subject = subject
        self._job_id = job_id
        self._attempt = attempt
        self._node = node
        self._coalesce = coalesce
        self._seq = 0
        self._pending: list[_Run] = []
        self._pending_bytes = 0
        # A plain answer's first delta waits like the rest: nobody reads it before DONE.
        self._last_sent = 0.0 if first_at_once else time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._start_timer: asyncio.TimerHandle | None = None
        self.tokens_sent = 0

    @property
    def tokens(self) -> int:
        """Every token handed to this stream: sent, or waiting to go with the next message."""
        return self.tokens_sent + sum(run.tokens for run in self._pending)

    def _next_seq(self) -> int:
        self.cancel_start()
        seq = self._seq
        self._seq += 1
        return seq

    def _stamped(self, ev: Start | Delta | Done | Failed) -> bytes:
        """The event as it goes out: the attempt's first, whatever its kind (a plain answer's
        DONE may be it), carries the node's proof."""
        if ev.seq == 0 and self._proof:
            ev = dataclasses.replace(ev, proof=self._proof)
        self._last_sent = time.monotonic()
        return ev.encode()

    async def _send(self, ev: Start | Delta | Done | Failed) -> None:
        await self._nc.publish(self._subject, self._stamped(ev))

    def start(self, delay: float) -> None:
        """Tell the gateway the attempt began, unless another event does it first: a job whose
        first token comes within `delay` needs no START message at all (the gateway adopts an
        attempt by its sequence 0, whatever its kind)."""
        self._start_timer = asyncio.get_running_loop().call_later(delay, self._start_now)

    def _start_now(self) -> None:
        self._start_timer = None
        if self._seq == 0:
            asyncio.ensure_future(self._send_start())

    async def _send_start(self) -> None:
        """Numbered only here, in the same step that hands it to the client: numbered in the
        timer, a first delta sent before this task ran would leave with 1 ahead of START's 0,
        and the gateway refuses an attempt whose first event is not 0."""
        if self._seq == 0:
            await self._send(Start(self._job_id, self._attempt, self._next_seq(), self._node))

    def cancel_start(self) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None

    async def add(self, piece: Piece) -> None:
        last = self._pending[-1] if self._pending else None
        # A run keeps one choice's text before its tool-call fragments: text after a fragment
        # (or another input's vector) starts a run of its own, so nothing is reordered.
        if (
            last is None
            or last.index != piece.index
            or piece.embedding
            or (piece.text and last.tool_calls)
            or last.hides(piece)
        ):
            self._pending.append(_Run(piece.index))
        self._pending[-1].add(piece)
        self._pending_bytes += (
            len(piece.text) + len(piece.embedding) + 64 * (len(piece.logprobs) + len(piece.tool_calls))
        )
        waited = time.monotonic() - self._last_sent
        if waited >= self._coalesce or self._pending_bytes >= BATCH_BYTES:
            await self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._coalesce - waited, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        if self._pending:
            asyncio.ensure_future(self.flush())

    def _take_pieces(self) -> tuple[Piece, ...]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pieces = tuple(run.piece() for run in self._pending)
        self._pending, self._pending_bytes = [], 0
        self.tokens_sent += sum(p.tokens for p in pieces)
        return pieces

    async def flush(self) -> None:
        pieces = self._take_pieces()
        if pieces:
            await self._send(Delta(self._job_id, self._attempt, self._next_seq(), self._node, pieces))

    async def done(self, finish: list[FinishReason], usage: Usage, *, heard_within: float = 0.0) -> bool:
        """The last output (if any) travels with the done event: one message fewer. With
        `heard_within` > 0 it goes as a request: True if a gateway answered within that many
        seconds, False if none did (no responder, or no answer in time). The gateway answers
        once the job's usage record is stored, so the wait is best left to `billed`."""
        pieces = self._take_pieces()
        ev = Done(
            self._job_id,
            self._attempt,
            self._next_seq(),
            self._node,
            finish=tuple(finish),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cost=usage.cost,
            pieces=pieces,
        )
        data = self._stamped(ev)
        if heard_within <= 0:
            await self._nc.publish(self._subject, data)
            return True
        try:
            await self._nc.request(self._subject, data, timeout=heard_within)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return True

    def billed(self, finish: list[FinishReason], usage: Usage, *, within: float) -> asyncio.Task[bool]:
        """The done event as a request, waited on in the background: the task is True once the
        gateway answers that the job's usage record is stored, False if no gateway did within
        `within` seconds. Nothing of the attempt is sent after it, so its order holds."""
        return asyncio.ensure_future(self.done(finish, usage, heard_within=within))

    async def fail(self, error: TokenyardError, *, retryable: bool) -> None:
        await self.flush()
        ev = Failed(
            self._job_id, self._attempt, self._next_seq(), self._node, error=error.to_wire(), retryable=retryable
        )
        await self._send(ev)

    @property
    def seq(self) -> int:
        """The number the attempt's next event will carry (what a heartbeat tells the gateway)."""
        return self._seq

    def heartbeat(self) -> bytes:
        """A heartbeat carries the next sequence number, so the gateway can tell a lost message
        (its expected sequence is behind) from a quiet one. It is not itself in the sequence."""
        return Heartbeat(self._job_id, self._attempt, self._seq, self._node).encode()
