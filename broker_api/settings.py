"""Gateway settings: flags and TOKENYARD_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from schemas.settings import NatsSettings, add_common, add_replicas, add_setting, found_creds


@dataclass(frozen=True, slots=True)
class ApiSettings:
    nats_url: str
    nats_creds: str
    nats_tls_ca: str
    nats_tls_cert: str
    nats_tls_key: str
    nats_tls_hostname: str
    log_level: str
    log_json: bool
    host: str
    port: int
    data_dir: str
    admin_key: str  # empty: read or create <data_dir>/admin_key
    request_timeout: float  # seconds from arrival to the last byte of the answer
    attempt_silence: float  # seconds without a word from a running attempt before it counts as dead
    max_dispatches: int  # placements of one job (first + re-dispatches after failed attempts)
    max_body_bytes: int
    body_timeout: float  # seconds a request body may take to arrive (408 after)
    header_timeout: float  # seconds a request's headers may take to arrive (the connection is closed after)
    submit_timeout: float  # seconds to wait for the scheduler's answer before asking again
    pepper: str  # mixed into API-key digests; the same on every replica
    ledger: bool  # keep the usage ledger and audit log in process (SQLite in the data dir); else the ledger role
    ledger_name: str  # this ledger's durable consumer name: unique per ledger-keeping replica
    cache: bool  # answer identical deterministic requests from the shared response cache
    cache_ttl: float
    cache_max_bytes: int
    cache_hit_cost: float  # fraction of the original cost a cache hit is billed at
    responses_ttl: float  # seconds a stored Responses API answer is kept (previous_response_id, GET)
    continuation_models: str  # model ids (comma-separated; * all, the default; "" none) whose answers may be continued
    lanes: bool  # use the lanes schedulers grant (place an unlimited key's next jobs without asking)
    replicas: int  # JetStream replicas of the streams and buckets it makes (0: follow the cluster)
    console_idle: float  # seconds a web console session lives unused (the same on every replica)
    console_lifetime: float  # seconds a web console session lives at most, in use or not
    nats_auth_dir: str  # `tokenyard auth init`'s directory (node credentials are signed there); empty: the data dir
    nats_public_url: str  # the NATS URL(s) joining nodes are told; empty: --nats-url
    public_url: str  # this gateway's URL as remote nodes reach it (shown to admins); empty: from --host/--port
    tls_cert: str  # serve HTTPS with this certificate (and --tls-key)
    tls_key: str
    reserved_pools: str  # comma-separated pools only the operator's adapters may serve (besides cloud pools)
    join_rate: int  # join attempts per minute one client address may make (guessing tokens is bounded)
    orphan_grace: float  # seconds a worker's report of a job waits for its gateway's own record
    stream_stall_timeout: float  # seconds one write of a stream may wait on a client that stopped reading
    stream_idle_timeout: float  # seconds a started answer may go without output before it counts as hung
    otlp_endpoint: str = ""  # OpenTelemetry traces go here (schemas.otel); empty: none

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="tokenyard api", description="Run the Tokenyard OpenAI-compatible gateway.")
        add_common(p)
        add_replicas(p)
        add_setting(p, "--host", default="127.0.0.1", help="address to listen on")
        add_setting(p, "--port", default=8000, type=int, help="port to listen on")
        add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="where the admin key is kept")
        add_setting(p, "--admin-key", default="", help="bootstrap admin API key (default: generated into the data dir)")
        add_setting(p, "--request-timeout", default=300.0, type=float, help="seconds a request may take in all")
        add_setting(
            p,
            "--attempt-silence",
            default=5.0,
            type=float,
            help="seconds of silence after which a running attempt counts as dead",
        )
        add_setting(p, "--max-dispatches", default=3, type=int, help="placements of one job before giving up")
        add_setting(p, "--max-body-bytes", default=4 << 20, type=int, help="largest request body accepted")
        add_setting(p, "--body-timeout", default=30.0, type=float, help="seconds a request body may take to arrive")
        add_setting(p, "--header-timeout", default=10.0, type=float, help="seconds request headers may take to arrive")
        add_setting(p, "--submit-timeout", default=2.0, type=float, help="seconds to wait for the scheduler")
        add_setting(p, "--pepper", default="", help="secret mixed into API-key digests (same on every replica)")
        add_setting(
            p,
            "--ledger",
            default=False,
            type=bool,
            help="keep the usage ledger and audit log in this process (one-process setups); else ask the ledger role",
        )
        add_setting(p, "--ledger-name", default="main", help="unique name per replica that keeps a ledger")
        add_setting(p, "--cache", default=True, type=bool, help="serve identical deterministic requests from cache")
        add_setting(p, "--cache-ttl", default=3600.0, type=float, help="seconds a cached answer lives")
        add_setting(p, "--cache-max-bytes", default=256 << 20, type=int, help="size cap of the shared cache")
        add_setting(
            p, "--responses-ttl", default=30 * 86400.0, type=float, help="seconds a stored /v1/responses answer is kept"
        )
        add_setting(
            p, "--cache-hit-cost", default=0.0, type=float, help="fraction of the original cost billed for a cache hit"
        )
        add_setting(
            p,
            "--continuation-models",
            default="*",
            help="models (comma-separated, * for all, empty for none) whose interrupted answers continue on "
            "another route that accepts the delivered text as an assistant prefix",
        )
        add_setting(
            p,
            "--lanes",
            default=True,
            type=bool,
            help="place an unlimited key's next jobs straight on the queue a scheduler granted",
        )
        add_setting(p, "--console-idle", default=1800.0, type=float, help="seconds an unused web console session lives")
        add_setting(
            p, "--console-lifetime", default=43200.0, type=float, help="seconds a web console session lives at most"
        )
        add_setting(p, "--nats-auth-dir", default="", help="`tokenyard auth init` directory (default: the data dir)")
        add_setting(p, "--nats-public-url", default="", help="NATS URL(s) told to joining nodes (default: --nats-url)")
        add_setting(p, "--public-url", default="", help="this gateway's URL as remote nodes reach it")
        add_setting(p, "--tls-cert", default="", help="serve HTTPS with this certificate file")
        add_setting(p, "--tls-key", default="", help="the certificate's private key file")
        add_setting(
            p,
            "--reserved-pools",
            default="",
            help="pools no enrolled node may join (cloud providers' pools always are)",
        )
        add_setting(p, "--join-rate", default=30, type=int, help="join attempts per minute per client address")
        add_setting(
            p,
            "--orphan-grace",
            default=5.0,
            type=float,
            help="seconds a job whose gateway died waits for that gateway's record before its worker's report bills it",
        )
        add_setting(
            p,
            "--stream-stall-timeout",
            default=30.0,
            type=float,
            help="seconds a stream may wait on a client that stopped reading before its job is stopped",
        )
        add_setting(
            p,
            "--stream-idle-timeout",
            default=90.0,
            type=float,
            help="seconds a started answer may go without output (heartbeats do not count) before it fails over",
        )
        return p

    @property
    def nats(self) -> NatsSettings:
        """Its NATS connection; credentials from `<data dir>/creds/api.creds` when not given."""
        return NatsSettings(
            url=self.nats_url,
            creds=self.nats_creds or found_creds(self.data_dir, ("api",)),
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
            tls_hostname=self.nats_tls_hostname,
        )

    def continues(self, model: str) -> bool:
        allowed = {m.strip() for m in self.continuation_models.split(",") if m.strip()}
        return "*" in allowed or model in allowed

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> ApiSettings:
        a = cls.parser().parse_args(argv)
        return cls.build(**{k: v for k, v in vars(a).items()})

    @classmethod
    def build(cls, **overrides: object) -> ApiSettings:
        """Defaults (from the environment) with `overrides`: how tests and embedders make settings."""
        values = vars(cls.parser().parse_args([]))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
