"""The Responses API's stream: a job's pieces as Responses events, numbered in sequence.

    response.created, response.in_progress
    per output item: output_item.added,
        a message: content_part.added, output_text.delta..., output_text.done, content_part.done
        a function call: function_call_arguments.delta..., function_call_arguments.done
      output_item.done
    response.completed (response.incomplete when the output hit max_output_tokens)
    after an error once streaming: error, then response.failed

Text opens a message item; each tool call (by its index among the choice's calls) opens a
function_call item of its own, whose argument fragments are relayed as they came.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from broker_api.output import ChoiceResult
from broker_api.responses import Shaper, logprobs_out
from broker_api.serving import Serving
from broker_api.session import Session
from broker_api.web import event_frame
from schemas.errors import TokenyardError
from schemas.events import Piece, TokenLogprob
from schemas.responses import Response, ResponseError

Event = tuple[str, str]  # (type, JSON): one SSE event
OnFinal = Callable[[ChoiceResult, Response], Awaitable[None]]


@dataclass(slots=True)
class _Open:
    """The output item being streamed."""

    index: int  # output_index
    kind: str  # "message" | "function_call"
    item: dict[str, Any]
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    call: int = -1  # the tool call's index among the choice's calls


class EventWriter:
    """Turns pieces into Responses stream events, numbered in sequence."""

    def __init__(self, shaper: Shaper) -> None:
        self._shaper = shaper
        self._seq = 0
        self._items: list[dict[str, Any]] = []
        self._open: _Open | None = None
        self._job = shaper.s.job.id

    def _event(self, kind: str, **fields: Any) -> Event:
        body = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return kind, json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    def start(self) -> Iterator[Event]:
        pending = self._shaper.response(status="in_progress", output=[]).model_dump(mode="json")
        yield self._event("response.created", response=pending)
        yield self._event("response.in_progress", response=pending)

    def piece(self, piece: Piece) -> Iterator[Event]:
        if piece.text:
            yield from self._ensure_message()
            assert self._open is not None
            self._open.text.append(piece.text)
            self._open.logprobs.extend(piece.text_logprobs)
            yield self._event(
                "response.output_text.delta",
                item_id=self._open.item["id"],
                output_index=self._open.index,
                content_index=0,
                delta=piece.text,
                logprobs=[lp.model_dump() for lp in logprobs_out(piece.text_logprobs)],
            )
        for f in piece.tool_calls:
            if self._open is None or self._open.kind != "function_call" or self._open.call != f.index:
                yield from self._close()
                item = {
                    "id": f"fc_{self._job}_{f.index}",
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": f.id,
                    "name": f.name,
                    "arguments": "",
                }
                self._open = _Open(len(self._items), "function_call", item, call=f.index)
                yield self._event("response.output_item.added", output_index=self._open.index, item=item)
            if f.arguments:
                self._open.text.append(f.arguments)
                yield self._event(
                    "response.function_call_arguments.delta",
                    item_id=self._open.item["id"],
                    output_index=self._open.index,
                    delta=f.arguments,
                )

    def _ensure_message(self) -> Iterator[Event]:
        if self._open is not None and self._open.kind == "message":
            return
        yield from self._close()
        item = {
            "id": f"msg_{self._job}",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._open = _Open(len(self._items), "message", item)
        yield self._event("response.output_item.added", output_index=self._open.index, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield self._event(
            "response.content_part.added", item_id=item["id"], output_index=self._open.index, content_index=0, part=part
        )

    def _close(self, status: str = "completed") -> Iterator[Event]:
        o, self._open = self._open, None
        if o is None:
            return
        text = "".join(o.text)
        if o.kind == "message":
            logprobs = [lp.model_dump() for lp in logprobs_out(o.logprobs)]
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
            ids = {"item_id": o.item["id"], "output_index": o.index, "content_index": 0}
            yield self._event("response.output_text.done", **ids, text=text, logprobs=logprobs)
            yield self._event("response.content_part.done", **ids, part=part)
            item = {**o.item, "status": status, "content": [part]}
        else:
            yield self._event(
                "response.function_call_arguments.done",
                item_id=o.item["id"],
                output_index=o.index,
                name=o.item["name"],
                arguments=text,
            )
            item = {**o.item, "status": status, "arguments": text}
        self._items.append(item)
        yield self._event("response.output_item.done", output_index=o.index, item=item)

    def end(self, final: Response) -> Iterator[Event]:
        yield from self._close("incomplete" if final.status == "incomplete" else "completed")
        kind = "response.incomplete" if final.status == "incomplete" else "response.completed"
        yield self._event(kind, response=final.model_dump(mode="json"))

    def failed(self, e: TokenyardError) -> Iterator[Event]:
        yield from self._close("incomplete")
        yield self._event("error", code=e.code or e.type, message=e.message, param=e.param)
        code = "rate_limit_exceeded" if e.status == 429 else "server_error"
        response = self._shaper.response(status="failed", output=[], error=ResponseError(code=code, message=e.message))
        yield self._event("response.failed", response=response.model_dump(mode="json"))


class ResponseStream:
    """The Responses API as SSE (an `answering.Encoder`): `EventWriter`'s events, framed.
    `on_final(result, response)` runs once the answer is whole (to store it)."""

    def __init__(self, serving: Serving, s: Session, shaper: Shaper, on_final: OnFinal) -> None:
        self._serving, self._s, self._shaper, self._on_final = serving, s, shaper, on_final
        self._writer = EventWriter(shaper)

    def start(self) -> Iterator[bytes]:
        return _framed(self._writer.start())

    def piece(self, piece: Piece) -> Iterator[bytes]:
        return _framed(self._writer.piece(piece))

    def failed(self, e: TokenyardError) -> Iterator[bytes]:
        return _framed(self._writer.failed(e))

    async def end(self, results: list[ChoiceResult]) -> AsyncIterator[bytes]:
        (result,) = results
        final = self._shaper.final(result, self._serving.charge(self._s))
        await self._on_final(result, final)
        for frame in _framed(self._writer.end(final)):
            yield frame


def _framed(events: Iterator[Event]) -> Iterator[bytes]:
    return (event_frame(kind, payload) for kind, payload in events)
