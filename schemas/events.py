"""A job's events, worker -> gateway: one small frozen type per kind, joined as a union.

    Start | Delta | Done | Failed | Heartbeat

Every event names its job, its attempt (`Job.attempt_id`) and its sequence number within the
attempt (0, 1, 2, ... with no gaps; a heartbeat carries the number the next event will use, so
a lost event shows as a gap even when nothing follows it). `Delta` and `Done` carry `Piece`s:
one choice's increment of text, tool-call fragments and per-token logprobs. Structured, so a
tool call streamed by an upstream in fragments reaches the client fragment by fragment, in
order, exactly as sent. An embedding job's pieces carry vectors instead (`Piece.embedding`, one
piece per input, `index` the input's position), sent in as many deltas as the message size
limit needs; its `Done` counts the input tokens as `prompt_tokens`.

An attempt's first event (sequence 0, whatever its kind) may carry a `proof`: the ed25519
signature, by the node's own NATS user key, of `claim_message(job, attempt, node)`. The gateway
checks it against the key the node registry holds for that node id, so a node cannot put
another node's id (and its owner's price) on the work it did. One signature per attempt, never
per event.

`decode_event` reads any kind; the type checker narrows the union by `isinstance` or `match`.
Worker output is untrusted: decoding checks every field's type, and a malformed event is a
`WireError`, never a half-read object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from schemas.codec import WireError, need, pack, unpack

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "cancelled"]
FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "tool_calls", "content_filter", "cancelled"})
# A Done whose finish reasons are CANCELLED reports what a stopped attempt used until then: the
# gateway bills a request whose client left from it. Only a gateway still waiting reads it.
CANCELLED: FinishReason = "cancelled"
PROOF_BYTES = 64  # an ed25519 signature


def claim_message(job_id: str, attempt: int, node: str) -> bytes:
    """What a node signs to prove it ran an attempt: the job, the attempt and its own id."""
    return f"tokenyard-attempt-v1\x00{job_id}\x00{attempt}\x00{node}".encode()


@dataclass(frozen=True, slots=True)
class Claim:
    """Who an attempt's first event says ran it, and the proof it sent (b"": none)."""

    job_id: str
    attempt: int
    node: str
    proof: bytes = b""

    def message(self) -> bytes:
        return claim_message(self.job_id, self.attempt, self.node)


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One fragment of a tool call: its first fragment names it (`id`, `name`); the
    `arguments` of all its fragments, concatenated in order, are the call's JSON arguments (as
    far as they were generated, when max_tokens cut the call: finish_reason "length")."""

    index: int  # the call's position among the choice's tool calls
    id: str = ""
    name: str = ""
    arguments: str = ""

    def pack(self) -> list[Any]:
        return [self.index, self.id, self.name, self.arguments]

    @classmethod
    def unpack(cls, o: Any) -> ToolCallDelta:
        index, id_, name, arguments = _items(o, 4, "tool call")
        return cls(_int(index), _str(id_), _str(name), _str(arguments))


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None

    def pack(self) -> list[Any]:
        return [self.token, self.logprob, None if self.bytes is None else list(self.bytes)]

    @classmethod
    def unpack(cls, o: Any) -> TopLogprob:
        token, logprob, raw = _items(o, 3, "top logprob")
        return cls(_str(token), _float(logprob), _bytes(raw))


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log probability and the most likely alternatives at its position."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top: tuple[TopLogprob, ...] = ()

    def pack(self) -> list[Any]:
        raw = None if self.bytes is None else list(self.bytes)
        return [self.token, self.logprob, raw, [t.pack() for t in self.top]]

    @classmethod
    def unpack(cls, o: Any) -> TokenLogprob:
        token, logprob, raw, top = _items(o, 4, "logprob")
        return cls(_str(token), _float(logprob), _bytes(raw), tuple(TopLogprob.unpack(t) for t in _list(top)))


@dataclass(frozen=True, slots=True)
class Piece:
    """One choice's increment. `tokens` counts the generated tokens it holds (text and tool
    calls alike); `logprobs` has one entry per token where the request asked for them.
    `embedding` is an embedding job's vector for input `index`: float32 values, little-endian
    (the bytes OpenAI's `encoding_format: base64` encodes)."""

    index: int
    text: str = ""
    tokens: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    embedding: bytes = b""

    @property
    def text_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The logprobs a client is shown: its text's. A piece of tool-call fragments and no
        text holds its call's tokens, which OpenAI's `logprobs.content` ("message content
        tokens") does not list, nor does a Responses `output_text`. Every place that merges or
        relays pieces (the worker's coalescing, the gateway's output and its chunks) keeps these."""
        return () if self.tool_calls and not self.text else self.logprobs

    def pack(self) -> list[Any]:
        out: list[Any] = [self.index, self.text, self.tokens]
        if self.tool_calls or self.logprobs or self.embedding:
            out.append([c.pack() for c in self.tool_calls])
        if self.logprobs or self.embedding:
            out.append([lp.pack() for lp in self.logprobs])
        if self.embedding:
            out.append(self.embedding)
        return out

    @classmethod
    def unpack(cls, o: Any) -> Piece:
        items = _list(o)
        if not 3 <= len(items) <= 6:
            raise WireError("a piece has 3 to 6 items")
        calls = tuple(ToolCallDelta.unpack(c) for c in _list(items[3])) if len(items) > 3 else ()
        logprobs = tuple(TokenLogprob.unpack(lp) for lp in _list(items[4])) if len(items) > 4 else ()
        embedding = float32_vector(items[5]) if len(items) > 5 else b""
        return cls(_int(items[0]), _str(items[1]), _int(items[2]), calls, logprobs, embedding)


# --- the events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The worker pulled the job and is preparing it (sent only if no other event came first)."""

    kind: ClassVar[Literal["start"]] = "start"
    job_id: str
    attempt: int
    seq: int
    node: str
    proof: bytes = b""  # on sequence 0 only: see `claim_message`

    def encode(self) -> bytes:
        return pack(_head(self, self.proof))


@dataclass(frozen=True, slots=True)
class Delta:
    """Generated output for one or more choices."""

    kind: ClassVar[Literal["delta"]] = "delta"
    job_id: str
    attempt: int
    seq: int
    node: str
    pieces: tuple[Piece, ...]
    proof: bytes = b""

    def encode(self) -> bytes:
        return pack({**_head(self, self.proof), "p": [p.pack() for p in self.pieces]})


@dataclass(frozen=True, slots=True)
class Done:
    """Final: each choice's finish reason and the attempt's exact token counts (and its cost,
    where the route has a price table). May carry the last output too: one message fewer."""

    kind: ClassVar[Literal["done"]] = "done"
    job_id: str
    attempt: int
    seq: int
    node: str
    finish: tuple[FinishReason, ...]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cost: float | None = None
    pieces: tuple[Piece, ...] = ()
    proof: bytes = b""

    @property
    def cancelled(self) -> bool:
        return bool(self.finish) and all(f == CANCELLED for f in self.finish)

    def encode(self) -> bytes:
        o: dict[str, Any] = {
            **_head(self, self.proof),
            "f": list(self.finish),
            "pt": self.prompt_tokens,
            "ct": self.completion_tokens,
        }
        if self.pieces:
            o["p"] = [p.pack() for p in self.pieces]
        if self.cached_tokens:
            o["cached"] = self.cached_tokens
        if self.cost is not None:
            o["cost"] = self.cost
        return pack(o)


@dataclass(frozen=True, slots=True)
class Failed:
    """Final: the attempt failed. `error` is the error's wire form (`schemas.errors`);
    `retryable` says whether another attempt elsewhere may succeed."""

    kind: ClassVar[Literal["failed"]] = "failed"
    job_id: str
    attempt: int
    seq: int
    node: str
    error: dict[str, Any]
    retryable: bool
    proof: bytes = b""

    def encode(self) -> bytes:
        return pack({**_head(self, self.proof), "e": self.error, "r": self.retryable})


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Still alive (prefill, slow tokens), sent as a request: the gateway answers go on or stop.
    Not itself in the sequence: `seq` is the number the attempt's next event will carry."""

    kind: ClassVar[Literal["hb"]] = "hb"
    job_id: str
    attempt: int
    seq: int
    node: str

    def encode(self) -> bytes:
        return pack(_head(self))


Event = Union[Start, Delta, Done, Failed, Heartbeat]
Final = Union[Done, Failed]


def decode_event(data: bytes) -> Event:
    o = unpack(data)
    kind = need(o, "k")
    head = (_str(need(o, "j")), _int(need(o, "a")), _int(need(o, "s")), _str(o.get("n", "")))
    proof = _proof(o.get("pf", b""))
    if kind == Delta.kind:
        return Delta(*head, pieces=_pieces(o), proof=proof)
    if kind == Done.kind:
        finish = tuple(_finish(f) for f in _list(o.get("f", ())))
        cost = o.get("cost")
        return Done(
            *head,
            finish=finish,
            prompt_tokens=_int(o.get("pt", 0)),
            completion_tokens=_int(o.get("ct", 0)),
            cached_tokens=_int(o.get("cached", 0)),
            cost=None if cost is None else _float(cost),
            pieces=_pieces(o),
            proof=proof,
        )
    if kind == Failed.kind:
        error = o.get("e")
        if not isinstance(error, dict):
            raise WireError("a failed event needs an error map")
        return Failed(*head, error=error, retryable=bool(o.get("r", False)), proof=proof)
    if kind == Start.kind:
        return Start(*head, proof=proof)
    if kind == Heartbeat.kind:
        return Heartbeat(*head)
    raise WireError(f"unknown event kind {kind!r}")


def _head(ev: Event, proof: bytes = b"") -> dict[str, Any]:
    head = {"k": ev.kind, "j": ev.job_id, "a": ev.attempt, "s": ev.seq, "n": ev.node}
    if proof:
        head["pf"] = proof
    return head


def _proof(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) not in (0, PROOF_BYTES):
        raise WireError("a proof is an ed25519 signature")
    return value


def _pieces(o: dict[str, Any]) -> tuple[Piece, ...]:
    return tuple(Piece.unpack(p) for p in _list(o.get("p", ())))


def _finish(value: Any) -> FinishReason:
    if value not in FINISH_REASONS:
        raise WireError(f"unknown finish reason {value!r}")
    return value  # type: ignore[no-any-return]


# Strict readers for untrusted values: bool is not an int here, and nothing is coerced.
def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"expected an integer, got {type(value).__name__}")
    return value


def _float(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise WireError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise WireError(f"expected a string, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise WireError(f"expected a list, got {type(value).__name__}")
    return list(value)


def _items(value: Any, n: int, what: str) -> list[Any]:
    items = _list(value)
    if len(items) != n:
        raise WireError(f"a {what} has {n} items, not {len(items)}")
    return items


def float32_vector(value: Any) -> bytes:
    """An embedding as it travels: float32 bytes (events and cached answers alike)."""
    if not isinstance(value, bytes) or len(value) % 4:
        raise WireError("an embedding is float32 bytes")
    return value


def _bytes(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(_int(b) for b in _list(value))
