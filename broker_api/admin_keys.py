"""Changing an API key in place: `PATCH /v1/admin/keys/{id}` (rotating it, a new secret under
the same id, is `POST /v1/admin/keys/{id}/rotate` in `broker_api.admin_console`).

PATCH merges: only the fields the body gives change, and within `limits` only the limits it
names (`{"limits": {"rpm": 1000}}` keeps the key's other caps; 0 lifts one). Every change is
audited; an org admin may change only its own org's keys (another org's answer 404), and no
PATCH makes a key an admin key. `merged_limits` is the one merge, for orgs too.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from broker_api.auth import Principal
from broker_api.deps import Services, admin_caller, services, visible_key
from schemas.errors import InvalidRequestError
from schemas.tenancy import Limits
from schemas.validation import parse_body

router = APIRouter(prefix="/v1/admin")

Admin = Annotated[Principal, Depends(admin_caller)]
Svc = Annotated[Services, Depends(services)]


class LimitsPatch(BaseModel):
    """Limits to change; a limit not named keeps its value (0 lifts it)."""

    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    usd_per_day: float | None = Field(default=None, ge=0)
    usd_per_month: float | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0)
    max_body_bytes: int | None = Field(default=None, ge=0)


class KeyPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=200)
    project: str | None = None
    models: list[str] | None = None
    limits: LimitsPatch | None = None
    priority: Literal["interactive", "standard", "batch"] | None = None
    cache: bool | None = None
    volunteer_ok: bool | None = None


def merged_limits(current: Limits, patch: dict[str, Any] | None) -> Limits:
    """`current` with the limits `patch` names replaced (None or absent: unchanged)."""
    if not patch:
        return current
    given = {k: v for k, v in patch.items() if v is not None}
    return dataclasses.replace(current, **given)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:
        raise InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json") from e


@router.patch("/keys/{key_id}")
async def update_key(key_id: str, request: Request, who: Admin, s: Svc) -> dict[str, Any]:
    key = visible_key(s.directory, who, key_id)
    body: KeyPatch = parse_body(KeyPatch, await _json(request))
    changes: dict[str, Any] = body.model_dump(exclude_none=True, exclude={"limits", "models"})
    if body.models is not None:
        changes["models"] = tuple(body.models)
    if body.project:
        org = s.directory.org(key.org)
        if org is None or body.project not in org.projects:
            raise InvalidRequestError(f"The org has no project '{body.project}'.", param="project")
    limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else {}
    updated = dataclasses.replace(key, limits=merged_limits(key.limits, limits), **changes)
    await s.directory.put_key(updated)
    detail = {**body.model_dump(exclude_none=True, exclude={"limits"}), "limits": limits} if limits else changes
    s.auditor.record(who, request, "key.update", key.id, key.org, **detail)
    return updated.public()
