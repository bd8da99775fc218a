"""Scheduler settings: flags and TOKENYARD_* environment variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from schemas.settings import add_common, add_setting


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    nats_url: str
    log_level: str
    log_json: bool
    queue_max_jobs: int  # the work stream refuses new jobs beyond this (429 queue_full)
    queue_max_bytes: int
    queue_max_age: float  # seconds; a job older than this is dropped from the queue whatever its deadline
    replicas: int  # JetStream replicas of the work stream (3 on a 3-node cluster)
    remember_models: float  # seconds a model stays known after its last worker left

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="tokenyard scheduler", description="Run a Tokenyard scheduler.")
        add_common(p)
        add_setting(p, "--queue-max-jobs", default=100_000, type=int, help="most jobs waiting in all queues")
        add_setting(p, "--queue-max-bytes", default=1 << 30, type=int, help="most bytes waiting in all queues")
        add_setting(p, "--queue-max-age", default=3600.0, type=float, help="seconds a job may wait at most")
        add_setting(p, "--replicas", default=1, type=int, help="work stream replicas (1, or 3 on a cluster)")
        add_setting(p, "--remember-models", default=600.0, type=float,
                    help="seconds a model stays known after its last worker left")
        return p

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> SchedulerSettings:
        a = cls.parser().parse_args(argv)
        return cls(nats_url=a.nats_url, log_level=a.log_level, log_json=a.log_json,
                   queue_max_jobs=a.queue_max_jobs, queue_max_bytes=a.queue_max_bytes,
                   queue_max_age=a.queue_max_age, replicas=a.replicas, remember_models=a.remember_models)
