"""What every OpenAI route does around its translation: authenticate and read the body, open and
start the session, then answer with JSON or an SSE stream, with the headers that say how it was
answered (`x-tokenyard-cache`, `x-tokenyard-route`, `idempotent-replayed`).

`broker_api.routes_openai` (chat), `routes_completions`,
`routes_embeddings` and `routes_responses` share the same steps; only their translation
(`*_shape.py`, `responses.py`) differs. A stream is one loop (`stream`) for every API: each
route's `Encoder` says what its frames are (chat chunks, legacy completion chunks, Responses
events), the loop when they are sent, what an error after the first frame becomes, and how the
stream ends; `answer_stream` bounds its writes and bills what was written.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

import structlog
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from broker_api.auth import Principal
from broker_api.billing import served_by
from broker_api.body import read_json
from broker_api.deps import Services
from broker_api.output import ChoiceResult, answer_pieces
from broker_api.serving import STALLED, Serving
from broker_api.session import Ask, Session
from broker_api.sessions import signed_in
from broker_api.web import BoundedStream, sse, watch_disconnect
from schemas.errors import TokenyardError
from schemas.events import Piece

log = structlog.get_logger(__name__)

CACHE_HEADER = "x-tokenyard-cache"
ROUTE_HEADER = "x-tokenyard-route"
NO_CACHE = frozenset({"no", "bypass", "off"})

B = TypeVar("B", bound=BaseModel)


async def caller_and_body(request: Request, s: Services) -> tuple[Principal, Any]:
    """The authenticated caller (a console session, or a key) and the request's JSON body
    (bounded by its key's limit)."""
    who = signed_in(request) or s.keys.authenticate(request.headers.get("authorization"))
    limit = min(who.key_limits.max_body_bytes or s.settings.max_body_bytes, s.settings.max_body_bytes)
    return who, await read_json(request, limit=limit, timeout=s.settings.body_timeout)


async def begin(request: Request, s: Services, who: Principal, ask: Ask) -> Session:
    """Open the session and start it (replay, cache hit or admission); finished if that fails."""
    who.check_model(ask.model)
    session = s.serving.open(
        ask,
        who,
        use_cache=request.headers.get(CACHE_HEADER, "").lower() not in NO_CACHE,
        idempotency_key=request.headers.get("idempotency-key", ""),
        request_id=request.state.request_id,
        traceparent=request.state.traceparent,
    )
    try:
        await s.serving.start(session)
    except BaseException:
        await s.serving.finish(session, "not admitted")
        raise
    return session


def headers(s: Services, session: Session) -> dict[str, str]:
    """How the request was answered: replayed, or from the cache (or not), and by which route
    (`cache` for a cache hit), once that is known."""
    if session.state == "replayed":
        out = {"idempotent-replayed": "true"}
    else:
        out = {CACHE_HEADER: "hit" if session.cached else ("miss" if session.cache_key else "bypass")}
    _, route = served_by(session)
    out[ROUTE_HEADER] = "cache" if session.state == "cached" else route or "unknown"
    return out


async def answer_json(request: Request, s: Services, session: Session, work: Callable[[], Awaitable[B]]) -> Response:
    """The whole answer as JSON; the job is stopped if the client leaves first."""
    return await watch_disconnect(
        request,
        work,
        lambda: s.serving.finish(session, "client gone"),
        lambda body: Response(body.model_dump_json(), media_type="application/json", headers=headers(s, session)),
    )


class Encoder(Protocol):
    """One API's SSE stream of a run, as framed bytes (`web.data_frame`, `web.event_frame`)."""

    def start(self) -> Iterator[bytes]:
        """What opens the stream, once the first output (or the stored answer) is there."""
        ...

    def piece(self, piece: Piece) -> Iterator[bytes]:
        """One piece of the answer (a stored answer's: `output.answer_pieces`)."""
        ...

    def failed(self, e: TokenyardError) -> Iterator[bytes]:
        """What tells the client of an error once streaming (the stream then ends)."""
        ...

    def end(self, results: list[ChoiceResult]) -> AsyncIterator[bytes]:
        """The whole answer's last frames: finish reasons, usage, the terminal event."""
        ...


async def stream(serving: Serving, s: Session, enc: Encoder) -> AsyncGenerator[bytes, None]:
    """A run's SSE frames in `enc`'s API. The first is produced only once the job's first output
    came (or its stored answer), so an error up to then is still an HTTP error; after it, an
    error becomes the API's error frames and ends the stream."""
    if s.cached is not None:
        results = await serving.results(s)
        for frame in enc.start():
            yield frame
        for piece in answer_pieces(results):
            for frame in enc.piece(piece):
                yield frame
    else:
        events = serving.events(s)
        started = False
        try:
            async for ev in events:
                s.run.commit()
                if not started:
                    started = True
                    for frame in enc.start():
                        yield frame
                for piece in ev.pieces:
                    for frame in enc.piece(piece):
                        yield frame
        except TokenyardError as e:
            if not s.run.committed:
                raise
            log.warning("job.stream_failed", job_id=s.job.id, error=e.message)
            for frame in enc.failed(e):
                yield frame
            return
        finally:
            await events.aclose()
        if s.done is None:  # events() ends only at a DONE or by raising
            raise TokenyardError("The job ended without an answer.")
        results = s.output.results(s.done)
    async for frame in enc.end(results):
        yield frame


async def answer_stream(s: Services, session: Session, enc: Encoder) -> Response:
    """The answer as SSE: the first frame is produced before the response starts (an error up to
    then is an HTTP error). A client that stops reading ends the request, billed for what was
    written (`web.BoundedStream`)."""
    frames = stream(s.serving, session, enc)
    try:
        first = await frames.__anext__()
    except BaseException:
        await s.serving.finish(session, "failed")
        raise
    return BoundedStream(
        sse(first, frames, lambda: s.serving.finish(session, "stream closed")),
        stall=s.settings.stream_stall_timeout,
        on_stall=lambda: s.serving.finish(session, STALLED),
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers(s, session)},
    )
