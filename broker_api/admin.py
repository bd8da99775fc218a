"""The admin API: orgs, API keys, routing policies, usage reports and the audit log.

Every route needs an admin key and is scoped to the caller's org (the bootstrap key sees all
orgs); another org's ids answer 404, as if they did not exist. Bodies reject unknown fields.
Every change is written to the audit log: who, what, when, from where.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import nats.js.errors
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from broker_api.admin_keys import merged_limits
from broker_api.auth import Principal
from broker_api.body import read_json
from broker_api.directory import Directory
from broker_api.ledger import LedgerReader, to_csv
from broker_api.unavailable import retried
from schemas import routing
from schemas.errors import InvalidRequestError, NoCapacityError, NotFoundError, PermissionDeniedError
from schemas.tenancy import KeyRecord, Limits, OrgRecord
from schemas.usage import AuditEvent
from schemas.validation import parse_body

SIGNIN_EVERY = 3600.0  # an admin key's use of the admin API is audited at most this often per replica


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsBody(_Body):
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    max_concurrent: int = Field(default=0, ge=0)
    tokens_per_day: int = Field(default=0, ge=0)
    tokens_per_month: int = Field(default=0, ge=0)
    usd_per_day: float = Field(default=0.0, ge=0)
    usd_per_month: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=0, ge=0)
    max_body_bytes: int = Field(default=0, ge=0)

    def limits(self) -> Limits:
        return Limits(**self.model_dump())


class CreateOrg(_Body):
    name: str = Field(min_length=1, max_length=200)
    limits: LimitsBody = LimitsBody()
    projects: list[str] = []


class UpdateOrg(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    limits: LimitsBody | None = None
    projects: list[str] | None = None


class CreateKey(_Body):
    name: str = Field(min_length=1, max_length=200)
    org: str | None = None
    project: str = ""
    admin: bool = False
    models: list[str] = []
    limits: LimitsBody = LimitsBody()
    priority: Literal["interactive", "standard", "batch"] = "standard"
    expires_in: float | None = Field(default=None, gt=0)
    cache: bool = True
    volunteer_ok: bool = False


async def _json(request: Request) -> Any:
    settings = request.app.state.services.settings
    return await read_json(request, limit=settings.max_body_bytes, timeout=settings.body_timeout)


def _since_until(request: Request) -> tuple[float | None, float | None]:
    out: list[float | None] = []
    for name in ("since", "until"):
        raw = request.query_params.get(name)
        try:
            out.append(float(raw) if raw else None)
        except ValueError as e:
            raise InvalidRequestError(f"'{name}' must be a unix time in seconds.", param=name) from e
    return out[0], out[1]


class Admin:
    def __init__(self, directory: Directory, ledger: LedgerReader | None, audit: Any, routing_kv: KeyValue) -> None:
        self.directory = directory
        self.ledger = ledger
        self.routing = routing_kv
        self._audit = audit  # callable(AuditEvent)
        self._signins: dict[str, float] = {}

    def record(self, who: Principal, request: Request, action: str, target: str, org: str, **detail: Any) -> None:
        source = request.client.host if request.client else ""
        self._audit(
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

    def visible_org(self, who: Principal, org_id: str) -> OrgRecord:
        org = self.directory.org(org_id)
        if org is None or (not who.root and org.id != who.org):
            raise NotFoundError(f"No org with id '{org_id}'.", param="org")
        return org

    def visible_key(self, who: Principal, key_id: str) -> KeyRecord:
        key = self.directory.key(key_id)
        if key is None or (not who.root and key.org != who.org):
            raise NotFoundError(f"No API key with id '{key_id}'.")
        return key

    def need_ledger(self) -> LedgerReader:
        if self.ledger is None:
            raise NoCapacityError("This gateway keeps no ledger (--no-ledger); ask one that does.")
        return self.ledger


def admin_router(authenticate: Any) -> APIRouter:
    router = APIRouter(prefix="/v1/admin")

    def admin_of(request: Request) -> tuple[Admin, Principal]:
        who: Principal = authenticate(request)
        who.require_admin()
        admin: Admin = request.app.state.admin
        admin.signed_in(who, request)
        return admin, who

    @router.post("/orgs", status_code=201)
    async def create_org(request: Request) -> JSONResponse:
        admin, who = admin_of(request)
        if not who.root:
            raise PermissionDeniedError("Only the operator's admin key may create orgs.")
        body: CreateOrg = parse_body(CreateOrg, await _json(request))
        org = OrgRecord(
            id="org_" + uuid.uuid4().hex[:12],
            name=body.name,
            created=time.time(),
            limits=body.limits.limits(),
            projects=tuple(body.projects),
        )
        await admin.directory.put_org(org)
        admin.record(who, request, "org.create", org.id, org.id, name=org.name, limits=org.limits.to_dict())
        return JSONResponse(org.public(), status_code=201)

    @router.get("/orgs")
    async def list_orgs(request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        return {"object": "list", "data": [o.public() for o in admin.directory.orgs() if who.root or o.id == who.org]}

    @router.get("/orgs/{org_id}")
    async def get_org(org_id: str, request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        return admin.visible_org(who, org_id).public()

    @router.patch("/orgs/{org_id}")
    async def update_org(org_id: str, request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        org = admin.visible_org(who, org_id)
        if not who.root:
            raise PermissionDeniedError("Only the operator's admin key may change an org.")
        body: UpdateOrg = parse_body(UpdateOrg, await _json(request))
        updated = OrgRecord(
            id=org.id,
            name=body.name or org.name,
            created=org.created,
            # merged: only the limits the body names change (`{"limits": {"rpm": 1000}}` keeps the rest)
            limits=merged_limits(org.limits, body.limits.model_dump(exclude_unset=True)) if body.limits else org.limits,
            projects=tuple(body.projects) if body.projects is not None else org.projects,
        )
        await admin.directory.put_org(updated)
        admin.record(
            who, request, "org.update", org.id, org.id, **body.model_dump(exclude_none=True, exclude_unset=True)
        )
        return updated.public()

    @router.post("/keys", status_code=201)
    async def create_key(request: Request) -> JSONResponse:
        admin, who = admin_of(request)
        body: CreateKey = parse_body(CreateKey, await _json(request))
        org = admin.visible_org(who, body.org or who.org)
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
        secret, record = await admin.directory.issue_key(template)
        admin.record(
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
    async def list_keys(request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        org = who.scope(request.query_params.get("org"))
        return {"object": "list", "data": [k.public() for k in admin.directory.keys(org)]}

    @router.get("/keys/{key_id}")
    async def get_key(key_id: str, request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        return admin.visible_key(who, key_id).public()

    async def revoke(key_id: str, request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        key = admin.visible_key(who, key_id)
        if not key.revoked:
            key = KeyRecord(**{**{f: getattr(key, f) for f in key.__dataclass_fields__}, "revoked": time.time()})
            await admin.directory.put_key(key)
            admin.record(who, request, "key.revoke", key.id, key.org, name=key.name)
        return key.public()

    router.add_api_route("/keys/{key_id}/revoke", revoke, methods=["POST"])
    router.add_api_route("/keys/{key_id}", revoke, methods=["DELETE"])

    def ledger_query(request: Request) -> tuple[LedgerReader, str | None, float | None, float | None]:
        """The ledger, the org scope and the time window of a report request."""
        admin, who = admin_of(request)
        since, until = _since_until(request)
        return admin.need_ledger(), who.scope(request.query_params.get("org")), since, until

    @router.get("/usage")
    async def usage(request: Request) -> Response:
        ledger, org, since, until = ledger_query(request)
        rows = await ledger.report(org=org, by=request.query_params.get("group_by", "model"), since=since, until=until)
        return _rows(rows, request.query_params.get("format", "json"))

    @router.get("/usage/export")
    async def export(request: Request) -> Response:
        ledger, org, since, until = ledger_query(request)
        rows = await ledger.usage(org=org, since=since, until=until)
        return _rows(rows, request.query_params.get("format", "csv"))

    # --- routing policies (schedulers watch the bucket: a change applies to the next placement)

    async def set_policy(
        request: Request, who: Principal, admin: Admin, entry: str, target: str, org: str
    ) -> dict[str, Any]:
        try:
            policy = routing.Policy.from_dict(await _json(request))
        except ValueError as e:
            raise InvalidRequestError(f"Invalid routing policy: {e}.", param="policy") from e
        await retried(lambda: admin.routing.put(entry, policy.encode()), what="the routing change")
        admin.record(who, request, "routing.set", target, org, policy=policy.to_dict())
        return {"object": "routing.policy", "target": target, "policy": policy.to_dict()}

    async def delete_policy(
        request: Request, who: Principal, admin: Admin, entry: str, target: str, org: str
    ) -> dict[str, Any]:
        await retried(lambda: admin.routing.delete(entry), what="the routing change")
        admin.record(who, request, "routing.delete", target, org)
        return {"object": "routing.policy", "target": target, "deleted": True}

    def operator(request: Request) -> tuple[Admin, Principal]:
        admin, who = admin_of(request)
        if not who.root:
            raise PermissionDeniedError("Only the operator's admin key may change default and model routing.")
        return admin, who

    @router.get("/routing")
    async def get_routing(request: Request) -> dict[str, Any]:
        """The policies set here (a scheduler's `--routing-file` sits underneath them). An org
        admin sees the default, the models' and its own keys' policies."""
        admin, who = admin_of(request)
        out: dict[str, Any] = {"object": "routing", "default": None, "models": {}, "keys": {}}
        for scope, ident, policy in await _routing_entries(admin.routing):
            if scope == "default":
                out["default"] = policy
            elif scope == "model":
                out["models"][ident] = policy
            elif who.root or _org_of_key(admin.directory, ident) == who.org:
                out["keys"][ident] = policy
        return out

    @router.put("/routing/default")
    async def set_default(request: Request) -> dict[str, Any]:
        admin, who = operator(request)
        return await set_policy(request, who, admin, routing.DEFAULT_ENTRY, "default", who.org)

    @router.delete("/routing/default")
    async def delete_default(request: Request) -> dict[str, Any]:
        admin, who = operator(request)
        return await delete_policy(request, who, admin, routing.DEFAULT_ENTRY, "default", who.org)

    @router.put("/routing/keys/{key_id}")
    async def set_key_policy(key_id: str, request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        key = admin.visible_key(who, key_id)
        return await set_policy(request, who, admin, routing.key_entry(key.id), f"key:{key.id}", key.org)

    @router.delete("/routing/keys/{key_id}")
    async def delete_key_policy(key_id: str, request: Request) -> dict[str, Any]:
        admin, who = admin_of(request)
        key = admin.visible_key(who, key_id)
        return await delete_policy(request, who, admin, routing.key_entry(key.id), f"key:{key.id}", key.org)

    @router.put("/routing/models/{model:path}")
    async def set_model_policy(model: str, request: Request) -> dict[str, Any]:
        admin, who = operator(request)
        return await set_policy(request, who, admin, routing.model_entry(model), f"model:{model}", who.org)

    @router.delete("/routing/models/{model:path}")
    async def delete_model_policy(model: str, request: Request) -> dict[str, Any]:
        admin, who = operator(request)
        return await delete_policy(request, who, admin, routing.model_entry(model), f"model:{model}", who.org)

    @router.get("/audit")
    async def audit(request: Request) -> Response:
        ledger, org, since, until = ledger_query(request)
        rows = await ledger.audit(org=org, since=since, until=until)
        return _rows(rows, request.query_params.get("format", "json"))

    return router


def _org_of_key(directory: Directory, key_id: str) -> str | None:
    key = directory.key(key_id)
    return key.org if key else None


async def _routing_entries(kv: KeyValue) -> list[tuple[str, str, dict[str, Any]]]:
    """(scope, id, policy) of every entry in the routing bucket."""
    try:
        entries = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    out = []
    for entry in sorted(entries):
        try:
            scope, ident = routing.parse_entry(entry)
            value = (await kv.get(entry)).value
            out.append((scope, ident, routing.Policy.decode(value or b"").to_dict()))
        except (nats.js.errors.KeyNotFoundError, ValueError):  # deleted meanwhile, or not ours
            continue
    return out


def _rows(rows: list[dict[str, Any]], fmt: str) -> Response:
    if fmt == "csv":
        return Response(to_csv(rows), media_type="text/csv")
    if fmt == "json":
        return JSONResponse({"object": "list", "data": rows})
    raise InvalidRequestError("format must be json or csv.", param="format")
