"""The admin API: orgs, API keys, usage reports and the audit log (`/v1/admin/*`; routing
policies are `broker_api.routes_routing`).

Every route needs an admin key (`deps.admin_caller`) and is scoped to the caller's org (the
bootstrap key sees all orgs); another org's ids answer 404, as if they did not exist. Every
change is written to the audit log (`broker_api.audit`): who, what, when, from where.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import QueryParams

from broker_api import deps
from broker_api.admin_bodies import CreateKey, CreateOrg, UpdateOrg, json_body, since_until
from broker_api.admin_keys import merged_limits
from broker_api.auth import Principal
from broker_api.deps import Services, admin_caller, operator, services, visible_key, visible_org
from broker_api.ledger import LedgerReader, to_csv
from schemas.errors import InvalidRequestError
from schemas.tenancy import KeyRecord, OrgRecord
from schemas.validation import parse_body

router = APIRouter(prefix="/v1/admin")

Admin = Annotated[Principal, Depends(admin_caller)]
Operator = Annotated[Principal, Depends(operator)]
Svc = Annotated[Services, Depends(services)]

# --- orgs -----------------------------------------------------------------------------------


@router.post("/orgs", status_code=201)
async def create_org(request: Request, who: Operator, s: Svc) -> JSONResponse:
    body = parse_body(CreateOrg, await json_body(request, s.settings))
    org = OrgRecord(
        id="org_" + uuid.uuid4().hex[:12],
        name=body.name,
        created=time.time(),
        limits=body.limits.limits(),
        projects=tuple(body.projects),
    )
    await s.directory.put_org(org)
    s.auditor.record(who, request, "org.create", org.id, org.id, name=org.name, limits=org.limits.to_dict())
    return JSONResponse(org.public(), status_code=201)


@router.get("/orgs")
async def list_orgs(who: Admin, s: Svc) -> dict[str, Any]:
    return {"object": "list", "data": [o.public() for o in s.directory.orgs() if who.root or o.id == who.org]}


@router.get("/orgs/{org_id}")
async def get_org(org_id: str, who: Admin, s: Svc) -> dict[str, Any]:
    return visible_org(s.directory, who, org_id).public()


@router.patch("/orgs/{org_id}")
async def update_org(org_id: str, request: Request, who: Operator, s: Svc) -> dict[str, Any]:
    org = visible_org(s.directory, who, org_id)
    body = parse_body(UpdateOrg, await json_body(request, s.settings))
    updated = OrgRecord(
        id=org.id,
        name=body.name or org.name,
        created=org.created,
        # merged: only the limits the body names change (`{"limits": {"rpm": 1000}}` keeps the rest)
        limits=merged_limits(org.limits, body.limits.model_dump(exclude_unset=True)) if body.limits else org.limits,
        projects=tuple(body.projects) if body.projects is not None else org.projects,
    )
    await s.directory.put_org(updated)
    s.auditor.record(
        who, request, "org.update", org.id, org.id, **body.model_dump(exclude_none=True, exclude_unset=True)
    )
    return updated.public()


# --- keys -----------------------------------------------------------------------------------


@router.post("/keys", status_code=201)
async def create_key(request: Request, who: Admin, s: Svc) -> JSONResponse:
    body = parse_body(CreateKey, await json_body(request, s.settings))
    org = visible_org(s.directory, who, body.org or who.org)
    if body.project and body.project not in org.projects:
        raise InvalidRequestError(f"The org has no project '{body.project}'.", param="project")
    template = KeyRecord(
        id="",
        org=org.id,
        name=body.name,
        digest="",
        created=0.0,
        project=body.project,
        admin=body.admin,
        models=tuple(body.models),
        limits=body.limits.limits(),
        priority=body.priority,
        expires=time.time() + body.expires_in if body.expires_in else 0.0,
        cache=body.cache,
        volunteer_ok=body.volunteer_ok,
    )
    secret, record = await s.directory.issue_key(template)
    s.auditor.record(
        who,
        request,
        "key.create",
        record.id,
        org.id,
        name=record.name,
        admin=record.admin,
        limits=record.limits.to_dict(),
        priority=record.priority,
    )
    return JSONResponse({"key": secret, **record.public()}, status_code=201)


@router.get("/keys")
async def list_keys(request: Request, who: Admin, s: Svc) -> dict[str, Any]:
    org = who.scope(request.query_params.get("org"))
    return {"object": "list", "data": [k.public() for k in s.directory.keys(org)]}


@router.get("/keys/{key_id}")
async def get_key(key_id: str, who: Admin, s: Svc) -> dict[str, Any]:
    return visible_key(s.directory, who, key_id).public()


@router.post("/keys/{key_id}/revoke")
@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request, who: Admin, s: Svc) -> dict[str, Any]:
    key = visible_key(s.directory, who, key_id)
    if not key.revoked:
        key = dataclasses.replace(key, revoked=time.time())
        await s.directory.put_key(key)
        s.auditor.record(who, request, "key.revoke", key.id, key.org, name=key.name)
    return key.public()


# --- reports --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """A report request: the ledger, the org scope and the time window."""

    ledger: LedgerReader
    org: str | None
    since: float | None
    until: float | None
    params: QueryParams  # the rest of the query (format, group_by)


async def report(request: Request, who: Admin, ledger: Annotated[LedgerReader, Depends(deps.ledger)]) -> Report:
    since, until = since_until(request)
    return Report(ledger, who.scope(request.query_params.get("org")), since, until, request.query_params)


Query = Annotated[Report, Depends(report)]


@router.get("/usage")
async def usage(q: Query) -> Response:
    by = q.params.get("group_by", "model")
    rows = await q.ledger.report(org=q.org, by=by, since=q.since, until=q.until)
    return _rows(rows, q.params.get("format", "json"))


@router.get("/usage/export")
async def export(q: Query) -> Response:
    rows = await q.ledger.usage(org=q.org, since=q.since, until=q.until)
    return _rows(rows, q.params.get("format", "csv"))


@router.get("/audit")
async def audit(q: Query) -> Response:
    rows = await q.ledger.audit(org=q.org, since=q.since, until=q.until)
    return _rows(rows, q.params.get("format", "json"))


def _rows(rows: list[dict[str, Any]], fmt: str) -> Response:
    if fmt == "csv":
        return Response(to_csv(rows), media_type="text/csv")
    if fmt == "json":
        return JSONResponse({"object": "list", "data": rows})
    raise InvalidRequestError("format must be json or csv.", param="format")
