"""The node routes: enrolment tokens, joining, the node registry, and what nodes served.

    POST   /v1/admin/nodes/tokens          an enrolment token (the secret is in this answer only)
    GET    /v1/admin/nodes/tokens          the tokens (no secrets)
    GET    /v1/admin/nodes[/{id}]          the registry with each node's live state
    PATCH  /v1/admin/nodes/{id}            {"price": {"input": x, "output": y}} (USD per 1M tokens)
    POST   /v1/admin/nodes/{id}/disable    NATS credentials revoked, connection closed; no new jobs
    POST   /v1/admin/nodes/{id}/enable     the revocation lifted
    DELETE /v1/admin/nodes/{id}            removed (credentials stay revoked)
    GET    /v1/admin/nodes/{id}/usage      requests and tokens it served, by model and day
    POST   /v1/nodes/join                  a machine trades a token for its identity (no API key)

Admin routes are scoped like the rest of the admin API: an org's admin sees its org's nodes
(another org's ids answer 404), the operator's key sees all. Every change is audited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, Field

from broker_api.audit import Auditor
from broker_api.auth import Principal
from broker_api.deps import Services, admin_caller, services, visible_org
from broker_api.enrolment import Credentials, Enrolment
from broker_api.fleetwatch import FleetWatch
from broker_api.ledger import LedgerReader
from broker_api.nats_auth import AuthDir
from broker_api.registry import NodeRegistry
from broker_api.revocations import RevocationWatch
from broker_api.settings import ApiSettings
from schemas import subjects
from schemas.errors import InvalidRequestError, NoCapacityError, NotFoundError, UnavailableError
from schemas.nodes import Hardware
from schemas.registry import EnrolledKind, NodeRecord, Price, node_state
from schemas.validation import parse_body

log = structlog.get_logger(__name__)

MAX_TTL = 365 * 86400.0


@dataclass(frozen=True, slots=True)
class NodeServices:
    """What the node routes use, built in the app's lifespan (`deps.Services.nodes`)."""

    settings: ApiSettings
    enrolment: Enrolment
    fleet: FleetWatch
    auditor: Auditor
    ledger: LedgerReader | None  # this gateway's own, or the ledger role over NATS
    watch: RevocationWatch | None  # pushes the auth dir's revocations when `auth init` adds some (None: no auth dir)

    @classmethod
    async def open(
        cls,
        nc: NATS,
        settings: ApiSettings,
        *,
        fleet: FleetWatch,
        auditor: Auditor,
        ledger: LedgerReader | None,
        replicas: int | None,
    ) -> NodeServices:
        """The registry (its buckets made), and the credentials side when this gateway has an
        auth dir (`--nats-auth-dir`, else its data dir, as `tokenyard up` writes it)."""
        registry = await NodeRegistry.open(nc, nc.jetstream(), pepper=settings.pepper.encode(), replicas=replicas)
        auth = AuthDir.open(settings.nats_auth_dir or settings.data_dir)
        credentials = await Credentials.open(auth, settings.nats) if auth is not None else None
        enrolment = Enrolment(
            registry,
            credentials,
            reserved=frozenset(p.strip() for p in settings.reserved_pools.split(",") if p.strip()),
            cloud_pools=fleet.cloud_pools,
            join_rate=settings.join_rate,
        )
        watch = await RevocationWatch.start(enrolment, auth) if auth is not None else None
        return cls(settings=settings, enrolment=enrolment, fleet=fleet, auditor=auditor, ledger=ledger, watch=watch)

    async def close(self) -> None:
        if self.watch is not None:
            await self.watch.close()
        await self.enrolment.close()
        await self.enrolment.registry.close()


async def node_services(request: Request) -> NodeServices:
    return services(request).nodes


Admin = Annotated[Principal, Depends(admin_caller)]
Nodes = Annotated[NodeServices, Depends(node_services)]
Svc = Annotated[Services, Depends(services)]

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateToken(_Body):
    pool: str = Field(default="own", min_length=1, max_length=63)
    kind: EnrolledKind = "own"
    models: list[str] = Field(default=[], max_length=256)
    ttl: float = Field(default=86400.0, gt=0, le=MAX_TTL)  # seconds
    uses: int = Field(default=1, ge=1, le=100_000)
    org: str | None = None


class PriceBody(_Body):
    input: float = Field(default=0.0, ge=0, le=1e6)
    output: float = Field(default=0.0, ge=0, le=1e6)


class UpdateNode(_Body):
    price: PriceBody


class JoinBody(_Body):
    token: str = Field(min_length=1, max_length=512)
    models: list[str] = Field(default=[], max_length=256)
    name: str = Field(default="", max_length=200)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:
        raise InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json") from e


def _visible(n: NodeServices, who: Principal, node_id: str) -> NodeRecord:
    record = n.enrolment.registry.node(node_id)
    if record is None or (not who.root and record.org != who.org):
        raise NotFoundError(f"No node with id '{node_id}'.")
    return record


def view(n: NodeServices, record: NodeRecord, totals: dict[str, dict[str, int]]) -> dict[str, Any]:
    """A node as the admin API shows it: the registry's record with its adverts' live state."""
    seen = n.fleet.last(record.id)
    advert, at = seen if seen is not None else (None, 0.0)
    hardware = _hardware(advert.hardware) if advert is not None and advert.hardware is not None else None
    since_start = advert.served if advert is not None else None
    # the ledger's count (every request it served, billed); else what its adverts say since it started
    served = totals.get(record.id) or (
        {"requests": since_start.requests, "tokens": since_start.tokens}
        if since_start
        else {"requests": 0, "tokens": 0}
    )
    return {
        "object": "node",
        "id": record.id,
        "name": record.name,
        "org": record.org,
        "pool": record.pool,
        "kind": record.kind,
        "state": node_state(record, advert, time.time() - at if at else float("inf")),
        "models": list(record.models),
        "serving": [m.id for m in advert.models] if advert is not None else [],
        "hardware": hardware,
        "paused": bool(advert.paused) if advert is not None else False,  # idle-time mode: its owner is back
        "slots": {
            "total": advert.slots_total if advert else 0,
            "free": advert.slots_free if advert else 0,
            "used": (advert.slots_total - advert.slots_free) if advert else 0,
        },
        "requests": served["requests"],
        "tokens": served["tokens"],
        "last_seen": int(at) if at else None,
        "price": record.price.to_dict(),
        "created": int(record.created),
        "enabled": record.enabled,
    }


def _hardware(hw: Hardware) -> dict[str, Any]:
    """The node's machine as its worker detected it, with a one-line summary for tables."""
    gpus = [{"name": g.name, "memory": g.memory} for g in hw.gpus]
    if hw.gpus:
        summary = ", ".join(f"{g.name} {g.memory / 2**30:.0f} GiB" if g.memory else g.name for g in hw.gpus)
    else:
        summary = f"{hw.cpu or 'CPU'}, {hw.cores} cores, {hw.memory / 2**30:.0f} GiB RAM"
    return {
        "cpu": hw.cpu,
        "cores": hw.cores,
        "memory": hw.memory,
        "gpus": gpus,
        "system": hw.system,
        "summary": summary,
    }


async def _totals(n: NodeServices, nodes: list[str]) -> dict[str, dict[str, int]]:
    if n.ledger is None or not nodes:
        return {}
    try:
        return await n.ledger.node_totals(nodes)
    except UnavailableError:  # no ledger answers now: the counts from the nodes' adverts instead
        return {}


def _audit(n: NodeServices, who: Principal, request: Request, action: str, record: NodeRecord, **detail: Any) -> None:
    n.auditor.record(who, request, action, record.id, record.org, pool=record.pool, kind=record.kind, **detail)


# --- enrolment tokens ----------------------------------------------------------------------


@router.post("/v1/admin/nodes/tokens", status_code=201)
async def create_token(request: Request, who: Admin, n: Nodes, s: Svc) -> JSONResponse:
    body = parse_body(CreateToken, await _json(request))
    org = visible_org(s.directory, who, body.org or who.org)
    try:
        pool = subjects.check_pool(body.pool)
    except ValueError as e:
        raise InvalidRequestError(str(e), param="pool") from e
    secret, token = await n.enrolment.create_token(
        org=org.id,
        pool=pool,
        kind=body.kind,
        models=tuple(dict.fromkeys(body.models)),
        ttl=body.ttl,
        uses=body.uses,
        creator=who.key_id,
    )
    n.auditor.record(
        who, request, "node.token.create", token.id, org.id, pool=pool, kind=body.kind, uses=body.uses, ttl=body.ttl
    )
    return JSONResponse({"token": secret, **token.public(), "server": n.settings.public_url}, status_code=201)


@router.get("/v1/admin/nodes/tokens")
async def list_tokens(who: Admin, n: Nodes) -> dict[str, Any]:
    tokens = n.enrolment.registry.tokens(who.scope(None))
    return {"object": "list", "data": [t.public() for t in tokens]}


# --- the registry ----------------------------------------------------------------------------


@router.get("/v1/admin/nodes")
async def list_nodes(who: Admin, n: Nodes) -> dict[str, Any]:
    records = n.enrolment.registry.nodes(who.scope(None))
    totals = await _totals(n, [r.id for r in records])
    return {"object": "list", "data": [view(n, r, totals) for r in records]}


@router.get("/v1/admin/nodes/{node_id}")
async def get_node(node_id: str, who: Admin, n: Nodes) -> dict[str, Any]:
    record = _visible(n, who, node_id)
    return view(n, record, await _totals(n, [record.id]))


@router.patch("/v1/admin/nodes/{node_id}")
async def update_node(node_id: str, request: Request, who: Admin, n: Nodes) -> dict[str, Any]:
    record = _visible(n, who, node_id)
    body = parse_body(UpdateNode, await _json(request))
    price = Price(input=body.price.input, output=body.price.output)
    updated = record.replace(price=price)
    await n.enrolment.registry.put_node(updated)
    _audit(n, who, request, "node.price", updated, price=price.to_dict())
    return view(n, updated, await _totals(n, [record.id]))


async def _set_enabled(
    node_id: str, enabled: bool, request: Request, who: Principal, n: NodeServices
) -> dict[str, Any]:
    record = _visible(n, who, node_id)
    updated = await n.enrolment.set_enabled(record, enabled)
    if updated is not record:
        _audit(n, who, request, "node.enable" if enabled else "node.disable", updated)
    return view(n, updated, await _totals(n, [record.id]))


@router.post("/v1/admin/nodes/{node_id}/disable")
async def disable_node(node_id: str, request: Request, who: Admin, n: Nodes) -> dict[str, Any]:
    return await _set_enabled(node_id, False, request, who, n)


@router.post("/v1/admin/nodes/{node_id}/enable")
async def enable_node(node_id: str, request: Request, who: Admin, n: Nodes) -> dict[str, Any]:
    return await _set_enabled(node_id, True, request, who, n)


@router.delete("/v1/admin/nodes/{node_id}")
async def remove_node(node_id: str, request: Request, who: Admin, n: Nodes) -> dict[str, Any]:
    record = _visible(n, who, node_id)
    await n.enrolment.remove(record)
    _audit(n, who, request, "node.remove", record)
    return {"object": "node", "id": record.id, "deleted": True}


@router.get("/v1/admin/nodes/{node_id}/usage")
async def node_usage(node_id: str, who: Admin, n: Nodes) -> dict[str, Any]:
    record = _visible(n, who, node_id)
    if n.ledger is None:
        raise NoCapacityError("This gateway keeps no ledger (--no-ledger); ask one that does.")
    rows = await n.ledger.node_usage(record.id)
    return {"object": "list", "node": record.id, "data": rows}


# --- joining -------------------------------------------------------------------------------


@router.post("/v1/nodes/join")
async def join(request: Request, n: Nodes) -> dict[str, Any]:
    n.enrolment.limiter.check(request.client.host if request.client else "", time.monotonic())
    body = parse_body(JoinBody, await _json(request))
    joined = await n.enrolment.join(body.token, models=tuple(dict.fromkeys(body.models)), name=body.name)
    record = joined.node
    actor = Principal(org=record.org, key_id=f"enrol:{record.token}", admin=False)
    _audit(n, actor, request, "node.enrol", record, models=list(record.models), name=record.name)
    settings = n.settings
    return {
        "object": "node.join",
        "node_id": record.id,
        "org": record.org,
        "pool": record.pool,
        "kind": record.kind,
        "models": list(record.models),
        "nats_url": settings.nats_public_url or settings.nats_url,
        "creds": joined.creds,
    }
