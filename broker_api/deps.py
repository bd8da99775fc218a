"""The gateway's collaborators as one typed value, and the FastAPI dependencies routes take.

The lifespan (`broker_api.app`) builds every collaborator once and stores a `Services` on the
app; a route module declares what it needs as typed parameters:

    @router.get("/v1/admin/things")
    async def list_things(who: Annotated[Principal, Depends(admin_caller)],
                          s: Annotated[Services, Depends(services)]) -> dict[str, Any]: ...

so no handler reaches into untyped `request.app.state`, and no route is a closure. A route
that skips FastAPI's dependency machinery on purpose (the chat route: the hot path) and the
middleware call `services(request)` themselves.

`services` is a plain function (middleware calls it); every other dependency is `async def`:
FastAPI runs a plain `def` dependency in a worker thread, where the audit publish finds no
event loop, and every request would pay a thread hop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from nats.js.kv import KeyValue

from broker_api.audit import Auditor
from broker_api.auth import KeyStore, Principal
from broker_api.bus import Bus
from broker_api.directory import Directory
from broker_api.ledger import LedgerFeed, LedgerReader
from broker_api.metrics import Metrics
from broker_api.response_store import ResponseStore
from broker_api.serving import Serving
from broker_api.sessions import SessionStore, signed_in
from broker_api.settings import ApiSettings
from schemas.errors import NotFoundError, PermissionDeniedError
from schemas.tenancy import KeyRecord, OrgRecord

if TYPE_CHECKING:  # broker_api.nodes' routes depend on this module
    from broker_api.nodes import NodeServices


@dataclass(frozen=True, slots=True)
class Services:
    settings: ApiSettings
    bus: Bus
    keys: KeyStore
    directory: Directory
    serving: Serving
    auditor: Auditor
    routing: KeyValue  # the routing-policy bucket (schemas.streams.ROUTING)
    ledger: LedgerReader  # this gateway's own (--ledger), else the ledger role over NATS
    ledger_feed: LedgerFeed | None  # None: no ledger here (its consumers' lag is not this gateway's)
    metrics: Metrics
    sessions: SessionStore  # web console sessions (broker_api.sessions)
    nodes: NodeServices  # enrolment and the node registry (broker_api.nodes)
    responses: ResponseStore  # stored /v1/responses answers (previous_response_id, GET, DELETE)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


async def caller(request: Request, s: Annotated[Services, Depends(services)]) -> Principal:
    """The authenticated caller (401 without a valid key): the bearer key's, or the web
    console session's that `broker_api.console.SessionMiddleware` checked."""
    return signed_in(request) or s.keys.authenticate(request.headers.get("authorization"))


async def admin_caller(
    request: Request, s: Annotated[Services, Depends(services)], who: Annotated[Principal, Depends(caller)]
) -> Principal:
    """A caller with an admin key (403 otherwise); its use of the admin API is audited."""
    who.require_admin()
    s.auditor.signed_in(who, request)
    return who


async def operator(who: Annotated[Principal, Depends(admin_caller)]) -> Principal:
    """The operator's own (bootstrap) admin key: every org."""
    if not who.root:
        raise PermissionDeniedError("Only the operator's admin key may do this.")
    return who


async def ledger(s: Annotated[Services, Depends(services)]) -> LedgerReader:
    """Where usage and audit reports come from: this gateway's own ledger (`--ledger`), else
    the ledger role over NATS (a 503 with Retry-After while none answers)."""
    return s.ledger


def visible_org(directory: Directory, who: Principal, org_id: str) -> OrgRecord:
    """An org the caller may see; any other answers 404, as if it did not exist."""
    org = directory.org(org_id)
    if org is None or (not who.root and org.id != who.org):
        raise NotFoundError(f"No org with id '{org_id}'.", param="org")
    return org


def visible_key(directory: Directory, who: Principal, key_id: str) -> KeyRecord:
    """An API key the caller may see; another org's answers 404."""
    key = directory.key(key_id)
    if key is None or (not who.root and key.org != who.org):
        raise NotFoundError(f"No API key with id '{key_id}'.")
    return key
