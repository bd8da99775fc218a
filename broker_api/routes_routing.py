"""Routing policies through the admin API (`/v1/admin/routing*`): the default, a model's, an
API key's. Stored in the routing bucket (`schemas.streams.ROUTING`); every scheduler watches
it, so a change applies to the next placement without a restart. A scheduler's
`--routing-file` sits underneath what is set here.

An org admin steers its own keys; the default and model policies are the operator's.
"""

from __future__ import annotations

from typing import Annotated, Any

import nats.js.errors
from fastapi import APIRouter, Depends, Request

from broker_api.admin_bodies import json_body
from broker_api.auth import Principal
from broker_api.deps import Services, admin_caller, operator, services, visible_key
from broker_api.directory import Directory
from broker_api.unavailable import retried
from schemas import routing, streams, subjects
from schemas.errors import InvalidRequestError

router = APIRouter(prefix="/v1/admin/routing")

Admin = Annotated[Principal, Depends(admin_caller)]
Operator = Annotated[Principal, Depends(operator)]
Svc = Annotated[Services, Depends(services)]


@router.get("")
async def get_routing(who: Admin, s: Svc) -> dict[str, Any]:
    """The policies set here. An org admin sees the default, the models' and its own keys'."""
    out: dict[str, Any] = {"object": "routing", "default": None, "models": {}, "keys": {}}
    for scope, ident, policy in await _entries(s):
        if scope == "default":
            out["default"] = policy
        elif scope == "model":
            out["models"][ident] = policy
        elif who.root or _org_of_key(s.directory, ident) == who.org:
            out["keys"][ident] = policy
    return out


@router.put("/default")
async def set_default(request: Request, who: Operator, s: Svc) -> dict[str, Any]:
    return await _set(request, who, s, routing.DEFAULT_ENTRY, "default", who.org)


@router.delete("/default")
async def delete_default(request: Request, who: Operator, s: Svc) -> dict[str, Any]:
    return await _delete(request, who, s, routing.DEFAULT_ENTRY, "default", who.org)


@router.put("/keys/{key_id}")
async def set_key_policy(key_id: str, request: Request, who: Admin, s: Svc) -> dict[str, Any]:
    key = visible_key(s.directory, who, key_id)
    return await _set(request, who, s, routing.key_entry(key.id), f"key:{key.id}", key.org)


@router.delete("/keys/{key_id}")
async def delete_key_policy(key_id: str, request: Request, who: Admin, s: Svc) -> dict[str, Any]:
    key = visible_key(s.directory, who, key_id)
    return await _delete(request, who, s, routing.key_entry(key.id), f"key:{key.id}", key.org)


@router.put("/models/{model:path}")
async def set_model_policy(model: str, request: Request, who: Operator, s: Svc) -> dict[str, Any]:
    return await _set(request, who, s, routing.model_entry(model), f"model:{model}", who.org)


@router.delete("/models/{model:path}")
async def delete_model_policy(model: str, request: Request, who: Operator, s: Svc) -> dict[str, Any]:
    return await _delete(request, who, s, routing.model_entry(model), f"model:{model}", who.org)


async def _set(request: Request, who: Principal, s: Services, entry: str, target: str, org: str) -> dict[str, Any]:
    try:
        policy = routing.Policy.from_dict(await json_body(request, s.settings))
    except ValueError as e:
        raise InvalidRequestError(f"Invalid routing policy: {e}.", param="policy") from e
    await retried(lambda: s.routing.put(entry, policy.encode()), what="the routing change")
    s.auditor.record(who, request, "routing.set", target, org, policy=policy.to_dict())
    return {"object": "routing.policy", "target": target, "policy": policy.to_dict()}


async def _delete(request: Request, who: Principal, s: Services, entry: str, target: str, org: str) -> dict[str, Any]:
    await retried(lambda: s.routing.delete(entry), what="the routing change")
    s.auditor.record(who, request, "routing.delete", target, org)
    return {"object": "routing.policy", "target": target, "deleted": True}


def _org_of_key(directory: Directory, key_id: str) -> str | None:
    key = directory.key(key_id)
    return key.org if key else None


async def _entries(s: Services) -> list[tuple[str, str, dict[str, Any]]]:
    """(scope, id, policy) of every entry in the routing bucket. The entries are listed from
    the bucket's stream (the subjects that hold a message), not by `KeyValue.keys()`, whose
    watch can report an empty bucket on a loaded machine (it may signal "no more" before it
    processed what the server already delivered)."""
    prefix = subjects.kv_prefix(streams.ROUTING.bucket)
    info = await s.bus.nc.jetstream().stream_info(streams.ROUTING.stream.name, subjects_filter=f"{prefix}>")
    out = []
    for entry in sorted(subject[len(prefix) :] for subject in info.state.subjects or {}):
        try:
            scope, ident = routing.parse_entry(entry)
            value = (await s.routing.get(entry)).value
            out.append((scope, ident, routing.Policy.decode(value or b"").to_dict()))
        except (nats.js.errors.KeyNotFoundError, ValueError):  # deleted, or not ours
            continue
    return out
