"""`tokenyard worker`: connect to NATS, load the backend, serve until SIGTERM/SIGINT, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
from collections.abc import Awaitable, Callable

import nats
import nats.errors
import structlog

from schemas import subjects
from schemas.logs import close_quietly, configure_logging, run
from schemas.otel import Tracing
from schemas.probes import serve_probes
from schemas.settings import nats_options
from worker.backends import build_backend
from worker.hardware import detect_hardware
from worker.identity import Signer
from worker.idle import availability_for
from worker.metrics import WorkerMetrics
from worker.node_id import stable_node_id
from worker.providers import EXIT_CONFIG, ProviderConfigError
from worker.runtime import Worker
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

CLOSED_EXIT = 3  # NATS closed the connection for good (e.g. this node's credentials were revoked)
REFUSALS = {  # what nats-server answers a connect it refuses, and what to do about it
    "authorization violation": "credentials revoked, or not for this NATS",
    "maximum control line": "credentials longer than this NATS accepts: its nats-auth.conf predates the gateway's "
    "(run `tokenyard auth init` again and reload it), or enrol with fewer models",
}


def connect_errors(node_id: str) -> Callable[[Exception], Awaitable[None]]:
    """nats-py's error callback: a connect NATS refuses (retried for ever, else seen only as
    "Connection lost") is logged once per reason, with what to do; other errors as warnings."""
    refusals: set[str] = set()

    async def on_error(e: Exception) -> None:
        reason = str(e)
        hints = [hint for why, hint in REFUSALS.items() if why in reason.lower()]
        if isinstance(e, nats.errors.AuthorizationError) or hints:
            if reason not in refusals:
                refusals.add(reason)
                hint = hints[0] if hints else REFUSALS["authorization violation"]
                log.error("worker.connect_refused", node=node_id, reason=reason, hint=hint)
        else:
            log.warning("worker.nats_error", node=node_id, error=reason or type(e).__name__)

    return on_error


async def serve(settings: WorkerSettings) -> int:
    """Serve until SIGTERM/SIGINT (exit code 0) or until NATS refuses this worker for good:
    a disabled or removed node's credentials are revoked and its connection closed, and a
    worker that cannot reconnect must not linger as if it served (exit code CLOSED_EXIT)."""
    stop = asyncio.Event()
    closed = False
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def on_closed() -> None:
        nonlocal closed
        if not stop.is_set():
            closed = True
            log.error("worker.nats_closed", node=settings.node_id, hint="credentials refused or revoked?")
            stop.set()

    backend = await build_backend(settings)
    await backend.start()
    hardware = await asyncio.to_thread(detect_hardware)  # after the backend: it may have loaded torch
    idle = availability_for(settings, hardware)
    inbox = subjects.worker_inbox(settings.pool, settings.node_id)  # its own inbox: see schemas/permissions.py
    options = nats_options(settings.nats, name=f"tokenyard-worker-{settings.node_id}", inbox_prefix=inbox)
    nc = await nats.connect(**options, closed_cb=on_closed, error_cb=connect_errors(settings.node_id))
    metrics = WorkerMetrics(backend=settings.backend)
    tracing = Tracing.start(settings.otlp_endpoint, role="worker")
    worker = Worker(
        nc,
        nc.jetstream(),
        backend,
        settings,
        idle=idle,
        hardware=hardware,
        metrics=metrics,
        tracing=tracing,
        signer=Signer.from_creds(settings.nats.creds),
    )
    started = asyncio.Event()

    async def ready() -> bool:
        return started.is_set() and nc.is_connected and not worker.draining

    probes = await serve_probes(
        settings.metrics_host,
        settings.metrics_port,
        metrics=lambda: metrics.render(worker),
        ready=ready,
        role="worker",
    )
    try:
        await idle.start()
        await worker.start()
        started.set()
        await stop.wait()
        await worker.drain()
    finally:
        if probes is not None:
            await probes.close()
        await idle.stop()
        tracing.close()
        await close_quietly(nc)
        await backend.close()
    return CLOSED_EXIT if closed else 0


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_json, role="worker")
    try:
        if settings.node_id:
            raise SystemExit(run(serve(settings)))
        with stable_node_id(settings.data_dir) as node_id:
            code = run(serve(dataclasses.replace(settings, node_id=node_id)))
    except ProviderConfigError as e:  # one line naming the file, the field and the fix: no traceback
        print(f"tokenyard worker: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
