"""`tokenyard worker`: connect to NATS, load the backend, serve until SIGTERM/SIGINT, drain."""

from __future__ import annotations

import asyncio
import signal

import nats
import structlog

from schemas.logs import close_quietly, configure_logging, run
from schemas.permissions import worker_inbox
from worker.backends import build_backend
from worker.runtime import Worker
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


async def serve(settings: WorkerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backend = build_backend(settings)
    await backend.start()
    nc = await nats.connect(
        servers=settings.nats_url.split(","),
        name=f"tokenyard-worker-{settings.node_id}",
        ping_interval=10,
        inbox_prefix=worker_inbox(settings.node_id),  # its own inbox: see schemas/permissions.py
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
    )
    worker = Worker(nc, nc.jetstream(), backend, settings)
    try:
        await worker.start()
        await stop.wait()
        await worker.drain()
    finally:
        await close_quietly(nc)
        await backend.close()


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_json)
    run(serve(settings))


if __name__ == "__main__":
    main()
