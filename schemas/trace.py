"""Request correlation: the id every role logs for one request, and its W3C `traceparent`.

The gateway takes the client's `x-request-id` when it is sane (else makes one) and the
client's `traceparent` when it is valid (else starts a trace); both travel in the job
envelope (`schemas.jobs.Job`), so the scheduler and the worker bind the same ids to their log
lines. Pure functions, stdlib only.
"""

from __future__ import annotations

import re
import secrets

MAX_REQUEST_ID = 128
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def request_id(header: str | None) -> str:
    """The client's id if it is 1..128 printable characters, else a new `req_<hex>`."""
    if header and len(header) <= MAX_REQUEST_ID and header.isprintable():
        return header
    return "req_" + secrets.token_hex(16)


def traceparent(header: str | None) -> str:
    """A W3C trace context for this hop: the client's trace continued under a new span id,
    or a new sampled trace when the header is missing or invalid."""
    m = _TRACEPARENT.match((header or "").strip().lower())
    if m is not None and m.group(1) != "ff" and set(m.group(2)) != {"0"} and set(m.group(3)) != {"0"}:
        return f"00-{m.group(2)}-{secrets.token_hex(8)}-{m.group(4)}"
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def trace_id(parent: str) -> str:
    """The trace id of a traceparent ("" if it is not one)."""
    m = _TRACEPARENT.match(parent)
    return m.group(2) if m else ""
