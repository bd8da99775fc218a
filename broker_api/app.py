"""The FastAPI application: its collaborators built once in the lifespan, its routers, its
middleware and OpenAI-shaped errors for everything.

Where things are: OpenAI's routes `broker_api.routes_openai`, the admin API
`broker_api.routes_admin` and `broker_api.routes_routing` (and the console's, nodes' and keys'
routers), health and metrics `broker_api.routes_ops`; what routes may depend on
`broker_api.deps`; the error handlers and HTTP plumbing `broker_api.web`. A new route module is
one `include_router` line below.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import structlog
from fastapi import FastAPI

from broker_api import (
    admin_keys,
    routes_admin,
    routes_completions,
    routes_embeddings,
    routes_openai,
    routes_ops,
    routes_responses,
    routes_routing,
    unavailable,
)
from broker_api.accounting import Accounts
from broker_api.admin_console import router as admin_console_router
from broker_api.attribution import Attributor
from broker_api.audit import Auditor
from broker_api.auth import KeyStore
from broker_api.bus import Bus
from broker_api.cache import ResponseCache
from broker_api.console import SessionMiddleware
from broker_api.console import router as console_router
from broker_api.deps import Services
from broker_api.directory import Directory
from broker_api.fleetwatch import FleetWatch
from broker_api.idempotency import Idempotency
from broker_api.jobrun import SILENCE_BOUND
from broker_api.lag import KEEP, LoopLag
from broker_api.ledger import Ledger, LedgerFeed, LedgerReader
from broker_api.ledger_query import LedgerClient
from broker_api.metrics import Metrics
from broker_api.nodes import NodeServices
from broker_api.nodes import router as nodes_router
from broker_api.observe import ObserveMiddleware
from broker_api.orphans import Orphans
from broker_api.response_store import ResponseStore
from broker_api.serving import Serving
from broker_api.sessions import SessionStore
from broker_api.settings import ApiSettings
from broker_api.tickets import Tickets
from broker_api.unavailable import NATS_ERRORS
from broker_api.web import RequestIdMiddleware, add_error_handlers
from schemas import streams
from schemas.jetstream import ensure, open_bucket
from schemas.otel import Tracing
from schemas.settings import replicas_setting

log = structlog.get_logger(__name__)


async def open_services(settings: ApiSettings, admin_key: str, metrics: Metrics, stack: AsyncExitStack) -> Services:
    """Connect and build every collaborator; `stack` closes them again, in reverse order."""
    # how far behind this loop runs, read by every job's silence check (`broker_api.attempts`)
    lag = LoopLag(keep=max(KEEP, 2 * SILENCE_BOUND * settings.attempt_silence), counted=metrics.behind)
    stack.push_async_callback(_cancelled, asyncio.create_task(lag.run(), name="loop-lag"))
    bus = await Bus.connect(settings.nats, lanes=settings.lanes)
    stack.push_async_callback(bus.close)
    nc, js = bus.nc, bus.nc.jetstream()
    replicas = replicas_setting(settings.replicas)
    directory = await Directory.open(nc, js, pepper=settings.pepper.encode(), replicas=replicas)
    stack.push_async_callback(directory.close)
    keys = KeyStore(admin_key, directory)
    for spec in (streams.USAGE, streams.AUDIT, streams.ORPHANS):
        await ensure(nc, spec, replicas=replicas)
    # every gateway seals who asked into its jobs, and bills the jobs of a gateway that died
    tickets = await Tickets.open_shared(await open_bucket(nc, js, streams.SECRETS, replicas=replicas))
    accounts = Accounts(js)
    auditor = Auditor(accounts.audit)
    cache = (
        await ResponseCache.open(nc, js, ttl=settings.cache_ttl, max_bytes=settings.cache_max_bytes, replicas=replicas)
        if settings.cache
        else None
    )
    ledger = await Ledger.open(Path(settings.data_dir) / "ledger.sqlite") if settings.ledger else None
    if ledger is not None:
        stack.push_async_callback(ledger.close)
    stack.push_async_callback(accounts.flush)  # before the ledger closes, after what publishes stopped
    feed = LedgerFeed(js, ledger, name=settings.ledger_name) if ledger is not None else None
    if feed is not None:
        await feed.start()
        stack.push_async_callback(feed.stop)
    reports: LedgerReader = ledger if ledger is not None else LedgerClient(nc)  # else: the ledger role
    fleet = FleetWatch(nc, accounts.audit)  # also the node registry's live view
    await fleet.start()
    stack.push_async_callback(fleet.stop)
    nodes = await NodeServices.open(nc, settings, fleet=fleet, auditor=auditor, ledger=reports, replicas=replicas)
    stack.push_async_callback(nodes.close)
    attributor = Attributor(nodes.enrolment.registry, accounts.audit)  # which node a record names
    serving = Serving(
        bus,
        settings,
        accounts=accounts,
        idempotency=await Idempotency.open(nc, js, replicas=replicas),
        metrics=metrics,
        cache=cache,
        tickets=tickets,
        lag=lag,
        attribute=attributor.attribute,
    )
    stack.push_async_callback(serving.drain)  # cancelled requests waiting for their worker's count
    orphans = Orphans(js, tickets, grace=settings.orphan_grace, attribute=attributor.attribute)
    stack.push_async_callback(_cancelled, asyncio.create_task(orphans.run(), name="orphans"))
    return Services(
        settings=settings,
        bus=bus,
        keys=keys,
        directory=directory,
        serving=serving,
        auditor=auditor,
        routing=await open_bucket(nc, js, streams.ROUTING, replicas=replicas),
        ledger=reports,
        ledger_feed=feed,
        metrics=metrics,
        sessions=await SessionStore.open(
            nc, js, keys, idle=settings.console_idle, lifetime=settings.console_lifetime, replicas=replicas
        ),
        nodes=nodes,
        responses=await ResponseStore.open(nc, js, ttl=settings.responses_ttl, replicas=replicas),
    )


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Stop a background loop; one that had died already says why."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # noqa: BLE001 - shutting down: the loop's death is logged, the rest still closes
        log.exception("api.background_failed", task=task.get_name())


def create_app(settings: ApiSettings, *, admin_key: str) -> FastAPI:
    """The gateway app; it connects to NATS (`settings.nats`) in its lifespan."""
    metrics = Metrics()  # the HTTP edge counts into it before any route runs
    tracing = Tracing.start(settings.otlp_endpoint, role="api")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stack.callback(tracing.close)
            # the one thing kept on the app: routes reach it through `broker_api.deps`
            app.state.services = await open_services(settings, admin_key, metrics, stack)
            log.info("api.started", gateway=app.state.services.bus.gateway_id)
            yield

    app = FastAPI(title="Tokenyard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware)
    # inside RequestIdMiddleware: it reads the id
    app.add_middleware(ObserveMiddleware, metrics=metrics, tracing=tracing)
    app.add_middleware(RequestIdMiddleware)
    add_error_handlers(app)
    for kind in NATS_ERRORS:  # NATS's own exceptions: a 503 with Retry-After, never a 500
        app.add_exception_handler(kind, unavailable.handle)
    app.include_router(routes_openai.router)
    app.include_router(routes_responses.router)
    app.include_router(routes_completions.router)
    app.include_router(routes_embeddings.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_routing.router)
    app.include_router(routes_ops.router)
    app.include_router(admin_console_router)
    app.include_router(console_router)
    app.include_router(nodes_router)
    app.include_router(admin_keys.router)
    return app
