"""`tokenyard worker`: connect to NATS, load the backend, serve until SIGTERM/SIGINT, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import signal

import nats
import structlog

from schemas.logs import close_quietly, configure_logging, run
from schemas.permissions import worker_inbox
from worker.backends import build_backend
from worker.hardware import detect_hardware
from worker.idle import availability_for
from worker.node_id import stable_node_id
from worker.runtime import Worker
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


async def serve(settings: WorkerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backend = await build_backend(settings)
    await backend.start()
    hardware = await asyncio.to_thread(detect_hardware)  # after the backend: it may have loaded torch
    idle = availability_for(settings, hardware)
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
    worker = Worker(nc, nc.jetstream(), backend, settings, idle=idle, hardware=hardware)
    try:
        await idle.start()
        await worker.start()
        await stop.wait()
        await worker.drain()
    finally:
        await idle.stop()
        await close_quietly(nc)
        await backend.close()


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_json)
    if settings.node_id:
        run(serve(settings))
        return
    with stable_node_id(settings.data_dir) as node_id:
        run(serve(dataclasses.replace(settings, node_id=node_id)))


if __name__ == "__main__":
    main()
