"""`tokenyard scheduler`: admission and placement as its own process; run as many as you like."""

from __future__ import annotations

import asyncio
import signal
import sys

import nats
import structlog

from scheduler.metrics import SchedulerMetrics
from scheduler.routing import RoutingTable
from scheduler.service import Scheduler
from scheduler.settings import SchedulerSettings
from schemas.logs import close_quietly, configure_logging, run
from schemas.otel import Tracing
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
    tracing = Tracing.start(settings.otlp_endpoint, role="scheduler")
    scheduler = await Scheduler.open(nc, nc.jetstream(), settings, metrics=metrics, tracing=tracing)
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
        tracing.close()
        log.info("scheduler.stopped")


def main(argv: list[str] | None = None) -> None:
    settings = SchedulerSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_json, role="scheduler")
    try:
        RoutingTable.load(settings.routing_file)  # a config error is one line and exit code 2, not a traceback
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        print(f"tokenyard scheduler: {settings.routing_file}: {reason}; fix --routing-file", file=sys.stderr)
        raise SystemExit(2) from None
    run(serve(settings))


if __name__ == "__main__":
    main()
