"""The gateway's HTTP connections: uvicorn's protocol with deadlines for slow clients.

uvicorn closes an idle keep-alive connection, but any byte that arrives restarts its clock, so
a client that trickles its request headers (or a body no route reads) one byte at a time holds
a connection, a file descriptor and a parser for as long as it likes: 300 such clients held 300
connections for 30 s. Here each connection's bytes are followed through HTTP/1.1's request
framing (`Framing`: where a request's head ends, how long its body is, chunked or not), and:

- a request's head must arrive within `header_timeout` seconds of its first byte, else the
  connection is closed, with a 408 error object when every earlier request on it was answered
  (so nothing else can be on the wire; a pipelining client just sees the close);
- a head larger than `max_header_bytes` is refused the same way with a 431, before the parser
  sees it;
- a body must arrive within `body_timeout` + BODY_GRACE seconds of its head. Routes that read
  a body answer 408 at `body_timeout` themselves (`broker_api.body`); this is the backstop for
  bodies nobody reads (a `GET /healthz` with a Content-Length that never comes);
- bytes uvicorn's parser refuses (an unknown method, a broken request line) get a 400 error
  object too, not uvicorn's plain text.

- a response whose writes stay paused (the client stopped reading: the connection's buffer is
  full) for `write_stall` + STALL_GRACE seconds is aborted. The stream's own bound
  (`broker_api.web.BoundedStream`) has stopped its job and billed it `STALL_GRACE` seconds
  earlier; this frees the connection and what it buffered (a close would wait for the client).
  So that "paused" means "the client is not reading" and not "the kernel took a few MB more",
  every connection's unsent bytes in the kernel are bounded (TCP_NOTSENT_LOWAT, NOTSENT_BYTES:
  what is in flight to a reading client is not, so a fast link is as fast as before).

Ordinary requests pay one `find` for the end of the head and a counter per body chunk.
`guarded_protocol` builds the protocol class to hand to uvicorn (`http=`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from schemas.errors import HeadersTooLargeError, InvalidRequestError, RequestTimeoutError, TokenyardError

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
BODY_GRACE = 2.0  # seconds past the body timeout before an unread body's connection is closed
LINGER = 1.0  # seconds a refused connection is still read (and discarded) after the answer
NOTSENT_BYTES = 64 * 1024  # unsent bytes a connection's socket may hold (beyond what is in flight)
STALL_GRACE = 1.0  # seconds past the stream's stall bound before its connection is aborted
MAX_CHUNK_LINE = 1024  # a chunk-size line (with extensions) longer than this is not followed

Phase = Literal["idle", "head", "body", "lost", "too_large"]


class Framing:
    """Where the bytes of one connection stand in HTTP/1.1 request framing. Pure: `feed` the
    bytes as they come and read `phase` (idle between requests, head, body) and `heads` (the
    number of requests whose head has begun). A framing it cannot follow (a malformed length,
    which uvicorn's parser refuses anyway) is `lost`: treated as a body that never ends."""

    def __init__(self, *, max_head: int = MAX_HEADER_BYTES) -> None:
        self.max_head = max_head
        self.heads = 0
        self._state = "idle"  # idle, head, length, size, data, data_end, trailer, lost, too_large
        self._buf = bytearray()  # the head, or the current chunk-size or trailer line
        self._left = 0  # body bytes (length) or chunk bytes (data, data_end) still to come

    @property
    def phase(self) -> Phase:
        if self._state in ("idle", "head", "lost", "too_large"):
            return self._state  # type: ignore[return-value]
        return "body"

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data) and self._state not in ("lost", "too_large"):
            i = self._step(data, i)

    def _step(self, data: bytes, i: int) -> int:
        state = self._state
        if state == "idle":
            while i < len(data) and data[i] in b"\r\n":  # empty lines before a request are allowed
                i += 1
            if i < len(data):
                self._state, self.heads = "head", self.heads + 1
                self._buf.clear()
            return i
        if state == "head":
            return self._read_head(data, i)
        if state in ("length", "data", "data_end"):
            take = min(self._left, len(data) - i)
            self._left -= take
            if not self._left:
                self._state = {"length": "idle", "data": "data_end", "data_end": "size"}[state]
                if self._state == "data_end":
                    self._left = 2  # the CRLF after a chunk's data
            return i + take
        return self._read_line(data, i)  # size, trailer

    def _read_head(self, data: bytes, i: int) -> int:
        seen = len(self._buf)
        self._buf += data[i:]
        end = self._buf.find(b"\r\n\r\n", max(0, seen - 3))
        if end < 0 or end + 4 > self.max_head:
            if end >= 0 or len(self._buf) > self.max_head:
                self._state = "too_large"
            return len(data)
        head = bytes(self._buf[: end + 4])
        self._buf.clear()
        self._start_body(head)
        return i + end + 4 - seen

    def _start_body(self, head: bytes) -> None:
        lengths, chunked = set(), False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
            elif name == b"content-length":
                lengths.add(value.strip())
        if chunked:
            self._state = "size"
        elif not lengths:
            self._state = "idle"
        elif len(lengths) == 1 and (raw := lengths.pop()).isdigit():
            self._left = int(raw)
            self._state = "length" if self._left else "idle"
        else:
            self._state = "lost"

    def _read_line(self, data: bytes, i: int) -> int:
        end = data.find(b"\n", i)
        if end < 0:
            self._buf += data[i:]
            if len(self._buf) > MAX_CHUNK_LINE:
                self._state = "lost"
            return len(data)
        line = (bytes(self._buf) + data[i:end]).rstrip(b"\r")
        self._buf.clear()
        if self._state == "trailer":
            if not line:  # the empty line that ends the trailers: the request is complete
                self._state = "idle"
            return end + 1
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            self._state = "lost"
            return end + 1
        self._state, self._left = ("data", size) if size else ("trailer", 0)
        return end + 1


@dataclass(frozen=True, slots=True)
class Deadlines:
    header_timeout: float
    body_timeout: float
    max_header_bytes: int = MAX_HEADER_BYTES
    write_stall: float = 0.0  # seconds writes may stay paused on a client that stopped reading; 0: no bound


class ConnectionGuard:
    """One connection's deadlines: a timer for the head or body in progress, if any."""

    def __init__(self, transport: asyncio.Transport, deadlines: Deadlines) -> None:
        self._transport = transport
        self._deadlines = deadlines
        self._framing = Framing(max_head=deadlines.max_header_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None  # armed while writes are paused
        self._armed: tuple[Phase, int] = ("idle", 0)
        self.answered = 0  # responses the protocol completed on this connection
        self._refused = False

    def received(self, data: bytes) -> bool:
        """Follow `data`; False if the connection was refused (the bytes must not be parsed)."""
        if self._refused:
            return False
        self._framing.feed(data)
        if self._framing.phase == "too_large":
            self._refuse(
                HeadersTooLargeError(
                    f"The request's headers are larger than the {self._deadlines.max_header_bytes}-byte limit."
                )
            )
            return False
        self._arm()
        return True

    def malformed(self, why: str) -> None:
        """The parser refused the bytes of the current request."""
        self._refuse(InvalidRequestError(f"{why.rstrip('.')}: this is not an HTTP/1.1 request.", code="invalid_http"))

    def closed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.resumed()

    def paused(self) -> None:
        """The connection's buffer is full: the client is not reading what it is sent."""
        if self._deadlines.write_stall > 0 and self._stall is None:
            delay = self._deadlines.write_stall + STALL_GRACE
            self._stall = asyncio.get_running_loop().call_later(delay, self._stalled)

    def resumed(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if not self._transport.is_closing() or self._transport.get_write_buffer_size():
            self._transport.abort()  # the buffered answer is dropped: the client was not taking it

    def _arm(self) -> None:
        now = (self._framing.phase, self._framing.heads)
        if now == self._armed:
            return  # the same head or body is still on its way: its deadline stands
        self.closed()
        self._armed = now
        d = self._deadlines
        delay = {"head": d.header_timeout, "body": d.body_timeout + BODY_GRACE, "lost": d.body_timeout + BODY_GRACE}
        if now[0] in delay:
            self._timer = asyncio.get_running_loop().call_later(delay[now[0]], self._expire, now)

    def _expire(self, armed: tuple[Phase, int]) -> None:
        self._timer = None
        if (self._framing.phase, self._framing.heads) != armed or self._transport.is_closing():
            return
        if armed[0] == "head":
            limit = self._deadlines.header_timeout
            self._refuse(RequestTimeoutError(f"The request's headers did not arrive within {limit:g} s."))
        else:
            self._refuse(None)

    def _refuse(self, error: TokenyardError | None) -> None:
        """Close the connection, answering `error` first if nothing else can be on the wire
        (every earlier request on it was answered). The close is a half-close, and what the
        client still sends is read and dropped for LINGER seconds: closing a socket with unread
        data makes the kernel reset the connection, and the client would lose what it was sent
        (this answer, or the route's own 408 for a body that kept trickling)."""
        self.closed()
        self._refused = True
        t = self._transport
        if t.is_closing():
            return
        # responses uvicorn still owes on this connection (the request being refused is owed none)
        owed = self._framing.heads - self.answered - (1 if error is not None else 0)
        quiet = owed <= 0
        if error is not None and quiet:
            t.write(error_response(error))
        if not quiet or not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER, t.close)


def error_response(error: TokenyardError) -> bytes:
    """A whole HTTP/1.1 response carrying `error`'s OpenAI error object, closing the connection."""
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    reason = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(
        error.status, "Error"
    )
    head = (
        f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"x-request-id: req_{uuid.uuid4().hex}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def guarded_protocol(deadlines: Deadlines) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11: what `http="auto"` picks)
    with a `ConnectionGuard` on every connection. Pass it to uvicorn as `http=`."""
    base: type[Any]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.tokenyard_guard = ConnectionGuard(transport, deadlines)
            sock = transport.get_extra_info("socket")
            if deadlines.write_stall > 0 and sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
                with contextlib.suppress(OSError):  # not TCP (a test's socket pair): no bound needed
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_BYTES)
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self.tokenyard_guard.received(data):
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            """What uvicorn answers bytes its parser cannot read (a bad method, request line or
            header): OpenAI's error object, like every other error, not uvicorn's plain text."""
            self.tokenyard_guard.malformed(msg)

        def on_response_complete(self) -> None:
            self.tokenyard_guard.answered += 1
            super().on_response_complete()

        def pause_writing(self) -> None:
            self.tokenyard_guard.paused()
            super().pause_writing()

        def resume_writing(self) -> None:
            self.tokenyard_guard.resumed()
            super().resume_writing()

        def connection_lost(self, exc: Exception | None) -> None:
            self.tokenyard_guard.closed()
            super().connection_lost(exc)

    return GuardedProtocol
