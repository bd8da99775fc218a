"""The gateway's one boundary for NATS's own exceptions: a NATS or JetStream error that reaches
it (a KV put, create, update or delete, a JetStream publish or API call that timed out, found
no responders, or was refused for want of a quorum) becomes `schemas.errors.UnavailableError`,
a 503 with `Retry-After`, never a 500.

Modules that own a write translate where they write (`Directory`'s KV writes call `unavailable`
themselves, so their callers see a `TokenyardError`); `broker_api.app` registers `handle` as
the exception handler for whatever else escapes a route. The response cache never gets
here: a cache error is a miss (`broker_api.cache`).
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse

from schemas.errors import UnavailableError
from schemas.jetstream import JetStreamError, JetStreamUnavailableError

log = structlog.get_logger(__name__)

RETRY_AFTER = 2.0  # seconds: about what a JetStream leader election takes on a three-node cluster

# What NATS raises when the shared state cannot take an operation now. nats-py's TimeoutError is
# a nats.errors.Error too; JetStream API refusals are nats.js.errors.APIError (also one).
NATS_ERRORS: tuple[type[Exception], ...] = (nats.errors.Error, JetStreamError, JetStreamUnavailableError)


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


async def handle(request: Request, e: Exception) -> JSONResponse:
    """The exception handler `broker_api.app` registers for `NATS_ERRORS`."""
    error = unavailable(e, what=f"{request.method} {request.url.path}")
    headers = {"retry-after": str(max(1, round(error.retry_after or RETRY_AFTER)))}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
