"""Scheduler settings: flags and TOKENYARD_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from schemas.settings import NatsSettings, add_common, add_metrics, add_replicas, add_setting


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    nats_url: str
    log_level: str
    log_json: bool
    queue_max_jobs: int  # the work stream refuses new jobs beyond this (429 queue_full)
    queue_max_bytes: int
    queue_max_age: float  # seconds; a job older than this is dropped from the queue whatever its deadline
    replicas: int  # JetStream replicas of every stream and bucket (0: follow the cluster)
    remember_models: float  # seconds a model stays known after its last worker left
    reservation_margin: float = 60.0  # seconds past a job's deadline its unsettled reservation lapses
    routing_file: str = ""  # JSON routing policies (scheduler.routing.RoutingTable); empty: most free slots
    breaker_failures: int = 5  # consecutive failures that open a pool's circuit breaker
    breaker_cooldown: float = 10.0  # seconds a breaker stays open before a probe
    intake_max_jobs: int = 100_000  # jobs held back (waiting for room) in all pools; beyond: 429 queue_full
    intake_max_per_tenant: int = 10_000  # ... of one tenant
    intake_ack_wait: float = 30.0  # seconds before a killed scheduler's held jobs go to another
    min_buffer: int = 4  # jobs a work queue may hold beyond what its workers run
    lane_credits: int = 16  # jobs a gateway may place without asking after an admission (0: never)
    lane_ttl: float = 0.5  # seconds such a lane lasts
    nats: NatsSettings = field(default_factory=NatsSettings)  # how it connects (credentials, TLS)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # /metrics, /healthz, /readyz (0: off; the flag's default is 9464)
    otlp_endpoint: str = ""  # OpenTelemetry traces go here (schemas.otel); empty: none

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="tokenyard scheduler", description="Run a Tokenyard scheduler.")
        add_common(p)
        add_setting(p, "--queue-max-jobs", default=100_000, type=int, help="most jobs waiting in all queues")
        add_setting(p, "--queue-max-bytes", default=1 << 30, type=int, help="most bytes waiting in all queues")
        add_setting(p, "--queue-max-age", default=3600.0, type=float, help="seconds a job may wait at most")
        add_replicas(p)
        add_setting(
            p,
            "--remember-models",
            default=600.0,
            type=float,
            help="seconds a model stays known after its last worker left",
        )
        add_setting(
            p,
            "--reservation-margin",
            default=60.0,
            type=float,
            help="seconds past a job's deadline an unsettled limit reservation lapses",
        )
        add_setting(p, "--routing-file", default="", help="JSON file of routing policies (default, per model, per key)")
        add_setting(p, "--breaker-failures", default=5, type=int, help="failures in a row that open a pool's breaker")
        add_setting(p, "--breaker-cooldown", default=10.0, type=float, help="seconds a breaker stays open")
        add_setting(p, "--intake-max-jobs", default=100_000, type=int, help="most jobs held back for fair release")
        add_setting(p, "--intake-max-per-tenant", default=10_000, type=int, help="... of one tenant")
        add_setting(
            p,
            "--intake-ack-wait",
            default=30.0,
            type=float,
            help="seconds before a dead scheduler's held jobs are taken over",
        )
        add_setting(p, "--min-buffer", default=4, type=int, help="jobs a work queue may hold beyond running ones")
        add_setting(
            p,
            "--lane-credits",
            default=16,
            type=int,
            help="jobs of an unlimited key a gateway may place without asking, after one admission (0: off)",
        )
        add_setting(p, "--lane-ttl", default=0.5, type=float, help="seconds such a lane lasts")
        add_setting(
            p,
            "--data-dir",
            default=os.path.expanduser("~/.tokenyard"),
            help="where `tokenyard up` keeps credentials (creds/scheduler.creds, unless --nats-creds)",
        )
        add_metrics(p, port=9464)
        return p

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> SchedulerSettings:
        a = cls.parser().parse_args(argv)
        return cls(
            nats_url=a.nats_url,
            log_level=a.log_level,
            log_json=a.log_json,
            queue_max_jobs=a.queue_max_jobs,
            queue_max_bytes=a.queue_max_bytes,
            queue_max_age=a.queue_max_age,
            replicas=a.replicas,
            remember_models=a.remember_models,
            reservation_margin=a.reservation_margin,
            routing_file=a.routing_file,
            breaker_failures=a.breaker_failures,
            breaker_cooldown=a.breaker_cooldown,
            intake_max_jobs=a.intake_max_jobs,
            intake_max_per_tenant=a.intake_max_per_tenant,
            intake_ack_wait=a.intake_ack_wait,
            min_buffer=a.min_buffer,
            lane_credits=a.lane_credits,
            lane_ttl=a.lane_ttl,
            nats=NatsSettings.of(a, roles=("scheduler",), data_dir=a.data_dir),
            metrics_host=a.metrics_host,
            metrics_port=a.metrics_port,
            otlp_endpoint=a.otlp_endpoint,
        )
