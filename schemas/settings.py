"""How every role reads its settings: a flag, else a `TOKENYARD_*` environment variable, else
the default. One convention, so `--nats-url` is always `TOKENYARD_NATS_URL`.

How every role connects to NATS is here too (`nats_options`): the same reconnect and ping
policy, its credentials (`--nats-creds`, else `<data dir>/creds/<role>.creds` where
`tokenyard up` or `tokenyard auth init` wrote them) and TLS (`--nats-tls-ca`, `--nats-tls-cert`,
`--nats-tls-key`), as the keyword arguments of nats-py's `connect`.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    add_setting(
        parser,
        "--nats-creds",
        default="",
        help="NATS credentials file (default: <data dir>/creds/<role>.creds when there; none: connect without)",
    )
    add_setting(parser, "--nats-tls-ca", default="", help="CA bundle that signed the NATS servers' certificates")
    add_setting(parser, "--nats-tls-cert", default="", help="client certificate for NATS (mutual TLS)")
    add_setting(parser, "--nats-tls-key", default="", help="the client certificate's key")
    add_setting(
        parser,
        "--nats-tls-hostname",
        default="",
        help="name to verify in the NATS server's certificate (default: the URL's host)",
    )
    add_setting(parser, "--log-level", default="info", help="debug, info, warning or error")
    add_setting(parser, "--log-json", default=False, type=bool, help="log JSON lines instead of text")
    add_setting(
        parser,
        "--otlp-endpoint",
        default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        help="export OpenTelemetry traces to this OTLP/HTTP collector (needs the [otel] extra; empty: off)",
    )


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """Where and how a role connects to NATS (`nats_options` turns it into `connect` arguments)."""

    url: str = DEFAULT_NATS_URL
    creds: str = ""  # a .creds file (user JWT + seed); empty: no credentials
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_hostname: str = ""  # the name to verify in the server's certificate, when not the URL's host

    @classmethod
    def of(cls, a: argparse.Namespace, *, roles: tuple[str, ...] = (), data_dir: str = "") -> NatsSettings:
        """From parsed `add_common` settings; credentials found in the data dir when not given."""
        return cls(
            url=a.nats_url,
            creds=a.nats_creds or found_creds(data_dir, roles),
            tls_ca=a.nats_tls_ca,
            tls_cert=a.nats_tls_cert,
            tls_key=a.nats_tls_key,
            tls_hostname=a.nats_tls_hostname,
        )


def creds_path(data_dir: str | Path, role: str) -> Path:
    """Where `tokenyard up` and `tokenyard auth init` keep a role's credentials."""
    return Path(data_dir).expanduser() / "creds" / f"{role}.creds"


def found_creds(data_dir: str, roles: tuple[str, ...]) -> str:
    """The first of `roles`' credentials present in `data_dir`, else empty."""
    if not data_dir:
        return ""
    for role in roles:
        path = creds_path(data_dir, role)
        if path.is_file():
            return str(path)
    return ""


def tls_context(n: NatsSettings) -> ssl.SSLContext | None:
    """A client TLS context when the settings ask for TLS (a CA, a client certificate or a
    `tls://` URL); None for plain connections."""
    if not (n.tls_ca or n.tls_cert or "tls://" in n.url):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=n.tls_ca or None)
    if n.tls_cert:
        ctx.load_cert_chain(n.tls_cert, n.tls_key or None)
    return ctx


def nats_options(n: NatsSettings, *, name: str, inbox_prefix: str = "") -> dict[str, Any]:
    """Keyword arguments of nats-py's `connect` for every role: pings every 10 s (a dead link is
    seen in seconds, not minutes), reconnects for ever, the credentials and TLS asked for."""
    options: dict[str, Any] = {
        "servers": [u.strip() for u in n.url.split(",") if u.strip()],
        "name": name,
        "ping_interval": 10,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
    }
    if n.creds:
        options["user_credentials"] = n.creds
    tls = tls_context(n)
    if tls is not None:
        options["tls"] = tls
        if n.tls_hostname:
            options["tls_hostname"] = n.tls_hostname
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    return options


def add_metrics(parser: argparse.ArgumentParser, *, port: int) -> None:
    """For the roles without an HTTP API: where their `/metrics`, `/healthz` and `/readyz` listen."""
    add_setting(parser, "--metrics-host", default="127.0.0.1", help="address of /metrics, /healthz and /readyz")
    add_setting(
        parser, "--metrics-port", default=port, type=int, help="port of /metrics, /healthz and /readyz (0: off)"
    )
