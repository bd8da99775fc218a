"""Admin API routes the web console needed and the admin API lacked, open to every admin
client like the rest of `/v1/admin/`:

- `POST /v1/admin/keys/{id}/rotate`: a new secret for the same key id (same org, limits,
  routing policy and usage history); the old secret, and every console session signed in with
  it, stop working at once. Answers like key creation: the secret, shown this once.
- `GET /v1/admin/usage/series?group_by=model&interval=3600`: usage over time, one row per
  time bucket and group (requests, tokens, cost), for charts; `format=csv` as the other reports.

Scoped like the rest of the admin API: an org admin sees and changes only its own org.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from broker_api.auth import Principal
from broker_api.deps import Services, admin_caller, ledger, services, visible_key
from broker_api.ledger import LedgerReader, to_csv
from schemas.errors import InvalidRequestError

router = APIRouter(prefix="/v1/admin")


@router.post("/keys/{key_id}/rotate")
async def rotate_key(
    key_id: str,
    request: Request,
    who: Annotated[Principal, Depends(admin_caller)],
    s: Annotated[Services, Depends(services)],
) -> dict[str, Any]:
    key = visible_key(s.directory, who, key_id)
    if not key.usable(time.time()):
        raise InvalidRequestError("A revoked or expired key cannot be rotated; create a new one.", param="key_id")
    secret, record = await s.directory.rotate_key(key)
    s.auditor.record(who, request, "key.rotate", record.id, record.org, name=record.name)
    return {"key": secret, **record.public()}


@router.get("/usage/series")
async def usage_series(
    who: Annotated[Principal, Depends(admin_caller)],
    the_ledger: Annotated[LedgerReader, Depends(ledger)],
    group_by: str = "model",
    interval: Annotated[int, Query(ge=1, le=31 * 86400)] = 3600,
    since: float | None = None,
    until: float | None = None,
    org: str | None = None,
    format: Literal["json", "csv"] = "json",
) -> Response:
    rows = await the_ledger.series(org=who.scope(org), by=group_by, interval=interval, since=since, until=until)
    if format == "csv":
        return Response(to_csv(rows), media_type="text/csv")
    return JSONResponse({"object": "list", "interval": interval, "data": rows})
