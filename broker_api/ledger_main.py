"""`tokenyard ledger`: the usage ledger and audit log as their own role.

Consumes the usage and audit streams into SQLite (`<data dir>/ledger.sqlite`, the default) or
PostgreSQL (`--database-url postgresql://...`), exactly once per job id and event id; answers
the gateways' usage, export and audit queries over NATS (`broker_api.ledger_query`); serves
`/metrics`, `/healthz` and `/readyz` on `--metrics-port`. (The fleet's node events reach the
audit log from the gateways, which watch the fleet for the node registry anyway.) It lives in
broker_api/ but runs as its own process and imports nothing of the gateway's request path.

Ledgers with the same `--ledger-name` share one durable consumer, so they must share one
database (PostgreSQL: run two for availability); a ledger keeping its own copy (SQLite) needs
its own name.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS

from broker_api.ledger import ACK_WAIT, LedgerFeed
from broker_api.ledger_query import LedgerService
from broker_api.ledger_store import LedgerStore, open_store
from schemas import streams
from schemas.jetstream import ensure
from schemas.logs import close_quietly, configure_logging, run
from schemas.probes import ProbeServer, serve_probes
from schemas.settings import (
    NatsSettings,
    add_common,
    add_metrics,
    add_replicas,
    add_setting,
    nats_options,
    replicas_setting,
)

log = structlog.get_logger(__name__)

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    nats: NatsSettings  # where and how it connects (credentials: <data dir>/creds/ledger.creds when there)
    log_level: str
    log_json: bool
    replicas: int  # of the usage and audit streams, if the ledger is the first to make them
    data_dir: str  # where SQLite's ledger.sqlite lives (without --database-url)
    database_url: str  # postgresql://user:password@host:5432/db, or empty for SQLite
    ledger_name: str  # the durable consumers' name: shared by ledgers on one database
    metrics_host: str
    metrics_port: int  # /metrics, /healthz, /readyz (0: none)
    ledger_ack_wait: float  # seconds before a killed ledger's unstored records go to the next reader

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="tokenyard ledger", description="Run the Tokenyard usage and audit ledger.")
        add_common(p)
        add_replicas(p)
        add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="where ledger.sqlite is kept")
        add_setting(
            p, "--database-url", default="", help="PostgreSQL URL (postgresql://user:pass@host/db); default SQLite"
        )
        add_setting(p, "--ledger-name", default="main", help="ledgers on one database share a name; copies do not")
        add_metrics(p, port=9466)
        add_setting(
            p,
            "--ledger-ack-wait",
            default=ACK_WAIT,
            type=float,
            help="seconds before records a killed ledger took are delivered again (new consumers only)",
        )
        return p

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> LedgerSettings:
        a = cls.parser().parse_args(argv)
        return cls(
            nats=NatsSettings.of(a, roles=("ledger",), data_dir=a.data_dir),
            log_level=a.log_level,
            log_json=a.log_json,
            replicas=a.replicas,
            data_dir=a.data_dir,
            database_url=a.database_url,
            ledger_name=a.ledger_name,
            metrics_host=a.metrics_host,
            metrics_port=a.metrics_port,
            ledger_ack_wait=a.ledger_ack_wait,
        )


class LedgerRole:
    """The parts of a running ledger, built by `open` and started and stopped together."""

    def __init__(self, nc: NATS, store: LedgerStore, settings: LedgerSettings) -> None:
        self._nc = nc
        self._store = store
        self._js = nc.jetstream()
        self.feed = LedgerFeed(self._js, store, name=settings.ledger_name, ack_wait=settings.ledger_ack_wait)
        self.service = LedgerService(nc, store)
        self._settings = settings
        self._probes: ProbeServer | None = None  # started in `start`, when everything it reports exists

    @classmethod
    async def open(cls, nc: NATS, settings: LedgerSettings) -> LedgerRole:
        replicas = replicas_setting(settings.replicas)
        for spec in (streams.USAGE, streams.AUDIT):
            await ensure(nc, spec, replicas=replicas)
        store = await open_store(settings.database_url, settings.data_dir)
        return cls(nc, store, settings)

    async def start(self) -> None:
        self._probes = await serve_probes(
            self._settings.metrics_host,
            self._settings.metrics_port,
            metrics=self.metrics,
            ready=self.ready,
            role="ledger",
        )
        await self.feed.start()
        await self.service.start()
        log.info("ledger.started", name=self.feed.name, metrics_port=self._probes.port if self._probes else None)

    async def stop(self) -> None:
        await self.service.stop()
        await self.feed.stop()
        if self._probes is not None:
            await self._probes.close()
        await self._store.close()

    async def lag(self) -> dict[str, int]:
        """Records per stream not stored yet: not delivered to this ledger, or delivered and not
        acked (-1 where the consumer cannot be read now)."""
        out: dict[str, int] = {}
        for stream, durable in self.feed.durables.values():
            try:
                info = await self._js.consumer_info(stream, durable, timeout=2.0)
                out[stream] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            except (nats.errors.Error, asyncio.TimeoutError):
                out[stream] = -1
        return out

    async def metrics(self) -> tuple[bytes, str]:
        lines = [
            "# HELP tokenyard_ledger_lag_records Records in the stream this ledger has not stored yet.",
            "# TYPE tokenyard_ledger_lag_records gauge",
        ]
        lines += [f'tokenyard_ledger_lag_records{{stream="{s}"}} {n}' for s, n in (await self.lag()).items()]
        lines += [
            "# HELP tokenyard_ledger_rows_stored_total Rows this process stored (new ones; duplicates are not rows).",
            "# TYPE tokenyard_ledger_rows_stored_total counter",
        ]
        lines += [f'tokenyard_ledger_rows_stored_total{{table="{t}"}} {n}' for t, n in self.feed.stored.items()]
        lines += [
            "# HELP tokenyard_ledger_queries_total Query pages this process answered.",
            "# TYPE tokenyard_ledger_queries_total counter",
            f"tokenyard_ledger_queries_total {self.service.answered}",
        ]
        return ("\n".join(lines) + "\n").encode(), METRICS_TYPE

    async def ready(self) -> bool:
        """Ready: connected to NATS, reading both streams, and the database answers."""
        try:
            await asyncio.wait_for(self._store.ping(), 2.0)
            database = True
        except Exception as e:  # top of a probe: any failure means not ready
            log.info("ledger.database_unready", error=repr(e))
            database = False
        return self._nc.is_connected and self.feed.running and database


async def serve(settings: LedgerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(**nats_options(settings.nats, name="tokenyard-ledger"))
    role = await LedgerRole.open(nc, settings)
    try:
        await role.start()
        await stop.wait()
    finally:
        await role.stop()
        await close_quietly(nc)
        log.info("ledger.stopped")


def main(argv: list[str] | None = None) -> None:
    settings = LedgerSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_json, role="ledger")
    run(serve(settings))


if __name__ == "__main__":
    main()
