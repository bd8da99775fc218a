"""How every role reads its settings: a flag, else a `TOKENYARD_*` environment variable, else
the default. One convention, so `--nats-url` is always `TOKENYARD_NATS_URL`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def env_name(flag: str) -> str:
    return "TOKENYARD_" + flag.lstrip("-").replace("-", "_").upper()


def add_setting(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: Any,
    help: str,
    type: Callable[[str], Any] = str,
) -> None:
    """Add `--flag`, whose default comes from the flag's environment variable when set."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if type is bool:
        value = default if raw is None else raw.strip().lower() in {"1", "true", "yes", "on"}
        parser.add_argument(
            flag, default=value, action=argparse.BooleanOptionalAction, help=f"{help} [env {env}; default {default}]"
        )
        return
    try:
        value = default if raw is None else type(raw)
    except ValueError as e:
        parser.error(f"{env}={raw!r}: {e}")
    parser.add_argument(flag, default=value, type=type, help=f"{help} [env {env}; default {default}]")


def add_replicas(parser: argparse.ArgumentParser) -> None:
    """For the roles that create streams and buckets (API, scheduler): one setting for all."""
    add_setting(
        parser,
        "--replicas",
        default=0,
        type=int,
        help="JetStream replicas of every stream and bucket (0: follow the cluster: 3 on 3+ servers, else 1)",
    )


def replicas_setting(value: int) -> int | None:
    """The `replicas` argument of `schemas.jetstream.ensure` for a `--replicas` value."""
    return value if value > 0 else None


def add_common(parser: argparse.ArgumentParser) -> None:
    add_setting(parser, "--nats-url", default=DEFAULT_NATS_URL, help="NATS server URL(s), comma-separated")
    add_setting(parser, "--log-level", default="info", help="debug, info, warning or error")
    add_setting(parser, "--log-json", default=False, type=bool, help="log JSON lines instead of text")
