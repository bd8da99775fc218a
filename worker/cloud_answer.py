"""Upstream answers read into a job's outputs: pure parsing, no I/O (`worker.cloud` does that).

`SseDecoder` turns a body's bytes into SSE events; `StreamState` turns OpenAI's chunks (chat's
`chat.completion.chunk` and legacy `text_completion`), or one whole answer, into `Piece`s,
`Finish`es and the `Usage`, with the checks that tell a finished answer from a truncated or
malformed one. Each streamed `delta.tool_calls` entry becomes one `ToolCallDelta` (index, id,
name, argument fragment) in upstream's order, never merged or reordered; `logprobs` (chat's, or
legacy completions' parallel lists) become `TokenLogprob`s. `embedding_outputs` reads an
`/embeddings` answer (base64 or JSON floats) into float32 vectors. Anything malformed is a
`WorkerFailedError` with code `upstream_malformed` (another route may do better).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import orjson
import structlog

from schemas.errors import WorkerFailedError
from schemas.events import FINISH_REASONS, FinishReason, Piece, TokenLogprob, ToolCallDelta, TopLogprob
from schemas.rules import estimate_request_prompt
from schemas.tasks import choices
from worker.backend import Finish, Output, Usage

log = structlog.get_logger(__name__)

EVENT_LIMIT = 1024 * 1024  # bytes of one SSE event before the stream counts as malformed
MESSAGE_LIMIT = 500  # characters of an upstream error message passed on


def upstream_error(detail: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) of an OpenAI error body, tolerantly."""
    try:
        err = json.loads(detail).get("error")
    except (ValueError, AttributeError):
        return "", None, None
    if isinstance(err, str):
        return err[:MESSAGE_LIMIT], None, None
    if not isinstance(err, dict):
        return "", None, None

    def text(v: Any) -> str | None:
        return str(v)[:MESSAGE_LIMIT] if isinstance(v, (str, int)) and v != "" else None

    return text(err.get("message")) or "", text(err.get("param")), text(err.get("code"))


class SseDecoder:
    """Server-sent events, incrementally: bytes in, each event's `data` out."""

    def __init__(self, limit: int = EVENT_LIMIT) -> None:
        self._limit = limit
        self._buffer = b""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[str]:
        lines = (self._buffer + chunk).split(b"\n")
        self._buffer = lines.pop()
        events: list[str] = []
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                self._data, self._size = [], 0
            elif line.startswith(b"data:"):
                value = line[5:].removeprefix(b" ")
                self._size += len(value)
                self._data.append(value.decode("utf-8", errors="replace"))
            # comments (":"), "event:", "id:" and "retry:" lines carry nothing we use
        if self._size + len(self._buffer) > self._limit:
            raise malformed("an event is larger than the limit")
        return events


class StreamState:
    """Upstream chunks (OpenAI's `chat.completion.chunk`) turned into outputs, with the checks
    that tell a finished answer from a truncated or malformed one."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.done = False
        self.finished: dict[int, FinishReason] = {}  # index -> reason, given out once the stream is known complete
        self.pieces = 0
        self.usage: tuple[int, int, int] | None = None

    def event(self, data: str) -> list[Output]:
        if data.strip() == "[DONE]":
            self.done = True
            return []
        return self.chunk(parse_json(data))

    def chunk(self, obj: Any) -> list[Output]:
        if not isinstance(obj, dict):
            raise malformed("a chunk is not a JSON object")
        if obj.get("error"):
            message, _, _ = upstream_error(json.dumps({"error": obj["error"]}).encode())
            raise WorkerFailedError(f"The upstream stream failed: {message or 'unknown error'}", code="upstream_error")
        choices = obj.get("choices") or []
        if not isinstance(choices, list):
            raise malformed("'choices' is not a list")
        out: list[Output] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise malformed("a choice is not an object")
            index = choice.get("index", 0)
            if not isinstance(index, int) or not 0 <= index < self.n:
                raise malformed(f"unexpected choice index {index!r}")
            piece = _piece(index, choice)
            if piece is not None:
                if index in self.finished:
                    raise malformed(f"output for choice {index} after it finished")
                self.pieces += piece.tokens
                out.append(piece)
            reason = choice.get("finish_reason")
            if reason is not None and index not in self.finished:
                self.finished[index] = _finish_reason(reason)
        if obj.get("usage"):
            self.usage = _usage(obj["usage"])
        return out

    def completion(self, obj: Any) -> list[Output]:
        """A whole (non-streamed) `chat.completion` or `text_completion`: each message read as
        one delta (its tool calls numbered by their place in the list)."""
        if isinstance(obj, dict) and isinstance(obj.get("choices"), list):
            obj = {**obj, "choices": [_as_delta(c) for c in obj["choices"]]}
        out = self.chunk(obj)
        self.done = True
        return out

    def end(self, request: dict[str, Any]) -> list[Output]:
        """The closing Finish items (if upstream left any out) and the Usage, or an error if the
        answer was cut short."""
        complete = len(self.finished) == self.n and self.usage is not None
        if not self.done and not complete:
            raise WorkerFailedError(
                "The upstream stream ended before the answer was complete.", code="upstream_disconnected"
            )
        missing = [i for i in range(self.n) if i not in self.finished]
        if missing:
            log.warning("cloud.finish_missing", choices=missing)
        out: list[Output] = [Finish(i, self.finished.get(i, "stop")) for i in range(self.n)]
        if self.usage is None:
            log.warning("cloud.usage_estimated")
            out.append(Usage(estimate_request_prompt(request), self.pieces))
        else:
            out.append(Usage(*self.usage))
        return out


def _piece(index: int, choice: dict[str, Any]) -> Piece | None:
    """A streamed choice's output: a chat delta's text (or refusal), tool-call fragments and
    logprobs, or a text completion's `text` and legacy logprobs; None if it holds none."""
    delta = choice.get("delta")
    calls: tuple[ToolCallDelta, ...] = ()
    if delta is None and "text" in choice:  # text_completion
        text = choice.get("text")
    else:
        if delta is not None and not isinstance(delta, dict):
            raise malformed("'delta' is not an object")
        delta = delta or {}
        text = delta.get("content") or delta.get("refusal")
        calls = _tool_calls(delta.get("tool_calls"))
    if text is not None and not isinstance(text, str):
        raise malformed("'content' is not a string")
    logprobs = _logprobs(choice.get("logprobs"))
    if not (text or calls or logprobs):
        return None
    # A chunk is a token, unless its logprobs count them (upstream's usage replaces this at the end).
    return Piece(index, text or "", max(1, len(logprobs)), calls, logprobs)


def _as_delta(choice: Any) -> Any:
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        return choice
    message = dict(choice["message"])
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message["tool_calls"] = [{**c, "index": i} if isinstance(c, dict) else c for i, c in enumerate(calls)]
    return {**choice, "delta": message}


def _tool_calls(value: Any) -> tuple[ToolCallDelta, ...]:
    """`delta.tool_calls`, one fragment per entry, in upstream's order."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise malformed("'tool_calls' is not a list")
    out = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(function or {}, dict):
            raise malformed("a tool call is not an object")
        function = function or {}
        index, id_, name, arguments = (
            call.get("index", 0),
            call.get("id") or "",
            function.get("name") or "",
            function.get("arguments") or "",
        )
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise malformed(f"unexpected tool call index {index!r}")
        if not all(isinstance(v, str) for v in (id_, name, arguments)):
            raise malformed("a tool call's id, name or arguments is not a string")
        out.append(ToolCallDelta(index, id_, name, arguments))
    return tuple(out)


def _logprobs(value: Any) -> tuple[TokenLogprob, ...]:
    """A choice's logprobs: chat's `{content: [...]}` or legacy completions' parallel lists."""
    if not value:
        return ()
    if not isinstance(value, dict):
        raise malformed("'logprobs' is not an object")
    try:
        if "tokens" in value:  # legacy: tokens, token_logprobs, top_logprobs: [{token: logprob}]
            tops = value.get("top_logprobs") or [None] * len(value["tokens"])
            return tuple(
                TokenLogprob(
                    str(token),
                    float(lp if lp is not None else -9999.0),
                    None,
                    tuple(TopLogprob(str(t), float(v)) for t, v in (top or {}).items()),
                )
                for token, lp, top in zip(value["tokens"], value.get("token_logprobs") or [], tops, strict=True)
            )
        return tuple(
            TokenLogprob(
                str(e["token"]),
                float(e["logprob"]),
                None if e.get("bytes") is None else tuple(int(b) for b in e["bytes"]),
                tuple(
                    TopLogprob(
                        str(t["token"]), float(t["logprob"]), None if t.get("bytes") is None else tuple(t["bytes"])
                    )
                    for t in e.get("top_logprobs") or ()
                ),
            )
            for e in value.get("content") or value.get("refusal") or ()
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise malformed(f"'logprobs' is not readable ({type(e).__name__})") from None


def embedding_outputs(obj: Any, request: dict[str, Any]) -> list[Output]:
    """An `/embeddings` answer's JSON as one Piece per input (its float32 vector), a Finish
    each, then the Usage (unpriced; estimated if upstream sent none)."""
    out: list[Output] = []
    items = obj.get("data") if isinstance(obj, dict) else None
    expected = choices(request)
    if not isinstance(items, list) or len(items) != expected:
        raise malformed(f"an embeddings answer needs {expected} vectors")
    seen: set[int] = set()
    for position, item in enumerate(items):
        index = item.get("index", position) if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < expected or index in seen:
            raise malformed(f"unexpected embedding index {index!r}")
        seen.add(index)
        out.append(Piece(index, embedding=_vector(item.get("embedding"))))
    usage = obj.get("usage") or {}
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 0:
        log.warning("cloud.usage_estimated")
        prompt = estimate_request_prompt(request)
    out.extend(Finish(i, "stop") for i in range(expected))
    out.append(Usage(prompt, 0))
    return out


def _vector(value: Any) -> bytes:
    """An embedding as float32 little-endian bytes: from base64 as sent, or from JSON floats."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            raise malformed("an embedding is not base64") from None
        if len(raw) % 4:
            raise malformed("an embedding is not float32 values")
        return raw
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        try:
            return struct.pack(f"<{len(value)}f", *value)
        except (struct.error, OverflowError):
            raise malformed("an embedding value is out of float32 range") from None
    raise malformed("an embedding is neither base64 nor a list of numbers")


def _usage(u: Any) -> tuple[int, int, int]:
    if not isinstance(u, dict):
        raise malformed("'usage' is not an object")
    details = u.get("prompt_tokens_details") or {}
    values = (
        u.get("prompt_tokens"),
        u.get("completion_tokens"),
        (details.get("cached_tokens") if isinstance(details, dict) else 0) or 0,
    )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise malformed("'usage' does not hold token counts")
    return values  # type: ignore[return-value]


def parse_json(data: bytes | str) -> Any:
    """orjson: about 0.6 us for a typical chunk against the standard library's 2.9 (a streamed
    answer is one parse per token). It refuses NaN, Infinity and integers beyond 64 bits, which
    no OpenAI answer holds: such a chunk is malformed."""
    try:
        return orjson.loads(data)
    except ValueError:
        raise malformed("a chunk is not JSON") from None


def _finish_reason(value: Any) -> FinishReason:
    """Upstream's finish reason as ours: the legacy `function_call` is `tool_calls`; one we do not
    know (a provider's own) ends the choice as `stop`."""
    if value == "function_call":
        return "tool_calls"
    if value in FINISH_REASONS and value != "cancelled":
        return value  # type: ignore[no-any-return]
    log.warning("cloud.unknown_finish_reason", reason=str(value)[:40])
    return "stop"


def malformed(what: str) -> WorkerFailedError:
    return WorkerFailedError(f"The upstream answer is malformed: {what}.", code="upstream_malformed")
