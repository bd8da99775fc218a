"""`tokenyard scheduler`: admission and placement as its own process; run as many as you like."""

from __future__ import annotations

import asyncio
import signal

import nats
import structlog

from scheduler.metrics import SchedulerMetrics
from scheduler.service import Scheduler
from scheduler.settings import SchedulerSettings
from schemas.logs import close_quietly, configure_logging, run
from schemas.probes import serve_probes
from schemas.settings import nats_options

log = structlog.get_logger(__name__)


async def serve(settings: SchedulerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(**nats_options(settings.nats, name="tokenyard-scheduler"))
    metrics = SchedulerMetrics()
    scheduler = await Scheduler.open(nc, nc.jetstream(), settings, metrics=metrics)
    started = asyncio.Event()

    async def ready() -> bool:
        return started.is_set() and nc.is_connected

    probes = await serve_probes(
        settings.metrics_host,
        settings.metrics_port,
        metrics=lambda: metrics.render(scheduler, nc.jetstream()),
        ready=ready,
        role="scheduler",
    )
    try:
        await scheduler.start()
        started.set()
        await stop.wait()
    finally:
        if probes is not None:
            await probes.close()
        await scheduler.stop()
        await close_quietly(nc)
        log.info("scheduler.stopped")


def main(argv: list[str] | None = None) -> None:
    settings = SchedulerSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_json, role="scheduler")
    run(serve(settings))


if __name__ == "__main__":
    main()
