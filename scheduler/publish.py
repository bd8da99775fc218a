"""Publishing a job to a JetStream stream (a work queue, the intake) through a leader election.

When a NATS node of three dies, each stream it led has no leader for the few seconds Raft
takes to elect one (4-9 s): a publish then finds no responder or times out. A job's publish
carries its message id, so asking again is safe (a copy that did land is a duplicate JetStream
drops); it is asked again until `PATIENCE` runs out, then the caller gets an UnavailableError
(503, Retry-After). A refusal by the stream itself (full: `schemas.jetstream.is_full`) is an
`APIError` and is raised at once; "duplicate message id is in process" (10158: the stream is
still storing an earlier try that timed out here) is asked again.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas.errors import UnavailableError
from schemas.jetstream import patiently

PATIENCE = 12.0  # seconds: longer than a stream's leader election
TIMEOUT = 5.0  # one publish's wait for its ack
RETRY_AFTER = 2.0
# No stream leader answered, or its answer did not come: the election is not over yet.
TRANSIENT = (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError, nats.errors.TimeoutError)
# The stream still works on an earlier publish of this message id (one that timed out here): the
# next try is answered as that one's duplicate, once it is stored.
DUPLICATE_IN_PROCESS = 10158


async def publish_job(
    js: JetStreamContext, subject: str, payload: bytes, *, msg_id: str, patience: float = PATIENCE
) -> PubAck:
    """JetStream's ack of the stored message (`duplicate`: it held this message id already)."""
    try:
        return await patiently(
            lambda: js.publish(subject, payload, timeout=TIMEOUT, headers={"Nats-Msg-Id": msg_id}),
            transient=transient,
            patience=patience,
            what=f"publish to {subject}",
        )
    except (*TRANSIENT, nats.js.errors.APIError) as e:
        if not transient(e):  # refused by the stream itself (full, say): the caller's to tell
            raise
        raise UnavailableError(
            "The job queue has no JetStream leader right now. Try again shortly.", retry_after=RETRY_AFTER
        ) from e


def transient(e: Exception) -> bool:
    """An error a leader election ends, or a publish of a message id still being stored."""
    return isinstance(e, TRANSIENT) or (isinstance(e, nats.js.errors.APIError) and e.err_code == DUPLICATE_IN_PROCESS)
