"""Recording who did what in the admin API: one audit event per change, published to the
audit stream (`schemas.usage.AuditEvent`), and admin sign-ins at most once an hour per key."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request

from broker_api.auth import Principal
from schemas.usage import AuditEvent

SIGNIN_EVERY = 3600.0  # an admin key's use of the admin API is audited at most this often per replica


class Auditor:
    def __init__(self, publish: Callable[[AuditEvent], None]) -> None:
        self._publish = publish
        self._signins: dict[str, float] = {}

    def record(self, who: Principal, request: Request, action: str, target: str, org: str, **detail: Any) -> None:
        source = request.client.host if request.client else ""
        self._publish(
            AuditEvent(
                id=uuid.uuid4().hex,
                time=time.time(),
                org=org,
                actor=who.key_id,
                action=action,
                target=target,
                source=source,
                detail=detail,
            )
        )

    def signed_in(self, who: Principal, request: Request) -> None:
        now = time.monotonic()
        if now - self._signins.get(who.key_id, -SIGNIN_EVERY) >= SIGNIN_EVERY:
            self._signins[who.key_id] = now
            self.record(who, request, "admin.signin", who.key_id, who.org)
