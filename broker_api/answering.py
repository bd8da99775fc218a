"""What every OpenAI route does around its translation: authenticate and read the body, open and
start the session, then answer with JSON or an SSE stream, with the headers that say how it was
answered (`x-tokenyard-cache`, `x-tokenyard-route`, `idempotent-replayed`).

`broker_api.routes_openai` (chat), `routes_completions`,
`routes_embeddings` and `routes_responses` share the same steps; only their translation
(`*_shape.py`, `responses.py`) differs.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from broker_api.auth import Principal
from broker_api.body import read_json
from broker_api.deps import Services
from broker_api.serving import STALLED
from broker_api.session import Ask, Session
from broker_api.sessions import signed_in
from broker_api.web import BoundedStream, sse, sse_events, watch_disconnect

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
    _, route = s.serving.served_by(session)
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


async def answer_stream(
    s: Services, session: Session, payloads: AsyncGenerator[Any, None], *, named: bool = False
) -> Response:
    """The answer as SSE: the first payload is produced before the response starts (an error
    up to then is an HTTP error). `named`: payloads are (event, JSON) pairs."""
    try:
        first = await payloads.__anext__()
    except BaseException:
        await s.serving.finish(session, "failed")
        raise
    close = lambda: s.serving.finish(session, "stream closed")  # noqa: E731
    body = sse_events(first, payloads, close) if named else sse(first, payloads, close)
    return BoundedStream(
        body,
        stall=s.settings.stream_stall_timeout,
        on_stall=lambda: s.serving.finish(session, STALLED),
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers(s, session)},
    )
