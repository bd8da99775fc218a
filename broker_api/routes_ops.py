"""Operators' routes: liveness (`/healthz`), readiness (`/readyz`: NATS and a scheduler answer)
and Prometheus metrics (`/metrics`). None needs a key: they say nothing about any tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from broker_api.deps import Services, services
from broker_api.metrics import consumer_lag

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(s: Annotated[Services, Depends(services)]) -> JSONResponse:
    ready = await s.bus.ready()
    return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(s: Annotated[Services, Depends(services)]) -> Response:
    js, feed = s.bus.nc.jetstream(), s.ledger_feed
    lag = (lambda: consumer_lag(js, feed.durables)) if feed is not None else None
    body, content_type = await s.metrics.render(js, lanes=s.bus.lanes.placed, ledger_lag=lag)
    return Response(body, media_type=content_type)
