"""The admin API's request bodies and query parameters: what a client may send, validated.

Bodies reject unknown fields (a typo, or a field a client may not set such as `digest`,
answers 400 `unknown_parameter`); every problem is OpenAI's error object naming the parameter.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from broker_api.body import read_json
from broker_api.settings import ApiSettings
from schemas.errors import InvalidRequestError
from schemas.tenancy import Limits


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


async def json_body(request: Request, settings: ApiSettings) -> Any:
    return await read_json(request, limit=settings.max_body_bytes, timeout=settings.body_timeout)


def since_until(request: Request) -> tuple[float | None, float | None]:
    """A report's time window (`since`, `until`: unix seconds, either may be absent)."""
    out: list[float | None] = []
    for name in ("since", "until"):
        raw = request.query_params.get(name)
        try:
            out.append(float(raw) if raw else None)
        except ValueError as e:
            raise InvalidRequestError(f"'{name}' must be a unix time in seconds.", param=name) from e
    return out[0], out[1]
