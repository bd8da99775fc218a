"""The gateway's one boundary for NATS's own exceptions: a NATS or JetStream error that reaches
it (a KV put, create, update or delete, a JetStream publish or API call that timed out, found
no responders, or was refused for want of a quorum) becomes `schemas.errors.UnavailableError`,
a 503 with `Retry-After`, never a 500.

Admin writes go through `retried`, which rides out a stream's leader election after a node died
(a 3-node cluster keeps its quorum, so the write then succeeds) and translates what remains
(`Directory`'s KV writes use it, so their callers see a `TokenyardError`); `broker_api.app` registers `handle` as
the exception handler for whatever else escapes a route. The response cache never gets
here: a cache error is a miss (`broker_api.cache`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse

from schemas.errors import UnavailableError
from schemas.jetstream import JetStreamError, JetStreamUnavailableError, patiently

log = structlog.get_logger(__name__)

T = TypeVar("T")

RETRY_AFTER = 2.0  # seconds: about what a JetStream leader election takes on a three-node cluster

# What NATS raises when the shared state cannot take an operation now. nats-py's TimeoutError is
# a nats.errors.Error too; JetStream API refusals are nats.js.errors.APIError (also one).
NATS_ERRORS: tuple[type[Exception], ...] = (nats.errors.Error, JetStreamError, JetStreamUnavailableError)
# ... of which these pass: no stream leader answered yet, a timeout, a reconnect under way.
TRANSIENT: tuple[type[Exception], ...] = (
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
)
WRITE_PATIENCE = 12.0  # seconds an admin write waits for a stream to elect a new leader


def unavailable(e: Exception, *, what: str = "the operation") -> UnavailableError:
    """The client-facing error for a NATS/JetStream failure `e` (logged here, once)."""
    if isinstance(e, (nats.errors.TimeoutError, JetStreamUnavailableError)):
        reason = "timed out"
    elif isinstance(e, nats.errors.NoRespondersError):
        reason = "found no JetStream leader"
    elif isinstance(e, (nats.js.errors.APIError, JetStreamError)):
        reason = f"was refused (JetStream error {getattr(e, 'err_code', None)})"
    elif isinstance(e, (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError)):
        reason = "found the NATS connection down"
    else:
        reason = "failed"
    log.warning("nats.unavailable", what=what, reason=reason, error=repr(e))
    return UnavailableError(
        f"The cluster could not complete {what} now ({reason}). Try again shortly; a retry is safe.",
        retry_after=RETRY_AFTER,
    )


async def retried(op: Callable[[], Awaitable[T]], *, what: str, patience: float = WRITE_PATIENCE) -> T:
    """Run a write (a KV put or delete: the same write twice is harmless), asking again while
    the error is one an election ends: a node just died and the stream's new leader is not
    chosen yet (JetStream's Raft waits 4-9 s before it elects). After `patience` seconds, or
    at once for any other NATS error, the caller's 503."""
    try:
        return await patiently(op, transient=lambda e: isinstance(e, TRANSIENT), patience=patience, what=what)
    except NATS_ERRORS as e:
        raise unavailable(e, what=what) from e


async def handle(request: Request, e: Exception) -> JSONResponse:
    """The exception handler `broker_api.app` registers for `NATS_ERRORS`."""
    error = unavailable(e, what=f"{request.method} {request.url.path}")
    headers = {"retry-after": str(max(1, round(error.retry_after or RETRY_AFTER)))}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
