"""`tokenyard auth init`: the command line of `broker_api.nats_auth` (which says what it makes),
the provider config and `--adapter` flags it reads each adapter's models from, and the push of
what it revoked to the running NATS at `--nats-url` (`broker_api.revocations.push_operator`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from broker_api.nats_auth import KEYS_FILE, AuthDir
from broker_api.revocations import POLL, PushError, push_operator
from schemas import logs
from schemas.settings import DEFAULT_NATS_URL, NatsSettings, add_setting


def provider_models(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Each provider a provider config names, with the public model ids it maps (the adapter
    validates the rest when it starts). Raises ValueError saying what is wrong."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read the provider config ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
    items = data.get("providers") if isinstance(data, dict) else None
    found: dict[str, tuple[str, ...]] = {}
    for item in items or ():
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: 'providers' must be a list of providers, each with a 'name'")
        models = item.get("models")
        found[name] = tuple(str(m) for m in models) if isinstance(models, dict) else ()
    if not found:
        raise ValueError(f"{path}: 'providers' must be a list of providers, each with a 'name'")
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenyard auth init", description="Make NATS credentials for a Tokenyard deployment."
    )
    p.add_argument("--out", required=True, help="directory for nats-auth.conf, creds/ and the signing keys")
    p.add_argument(
        "--providers", default="", help="a provider config (YAML): one adapter-<name>.creds each, held to its models"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=MODEL,...",
        help="one more cloud provider (repeatable): adapter-<name>.creds for exactly these models of its pool",
    )
    p.add_argument("--adapters", default="", help=argparse.SUPPRESS)  # refused: see main
    p.add_argument("--local-worker", action="store_true", help="also creds/worker.creds: the operator's own workers")
    p.add_argument("--resolver-dir", default="", help="where nats-server keeps account JWTs (default DIR/jwt)")
    add_setting(p, "--nats-url", default=DEFAULT_NATS_URL, help="running NATS to push revocations to, if any")
    add_setting(p, "--nats-tls-ca", default="", help="CA bundle that signed the NATS servers' certificates")
    add_setting(p, "--nats-tls-cert", default="", help="client certificate for NATS (mutual TLS)")
    add_setting(p, "--nats-tls-key", default="", help="the client certificate's key")
    add_setting(p, "--nats-tls-hostname", default="", help="name to verify in the NATS server's certificate")
    return p


def adapter_flags(values: list[str]) -> dict[str, tuple[str, ...]]:
    """`--adapter NAME=MODEL,...` values as provider name -> models; ValueError saying what is wrong."""
    found: dict[str, tuple[str, ...]] = {}
    for value in values:
        name, _, listed = value.partition("=")
        models = tuple(m.strip() for m in listed.split(",") if m.strip())
        if not name.strip() or not models:
            raise ValueError(f"--adapter {value!r}: give a provider and the models it serves: --adapter NAME=MODEL,...")
        if name.strip() in found:
            raise ValueError(f"--adapter {name.strip()!r} is given twice: list all its models in one --adapter")
        found[name.strip()] = models
    return found


def push_revocations(auth: AuthDir, a: argparse.Namespace, *, replaced: int) -> str:
    """Push the directory's revocations to the running NATS (`broker_api.revocations`), and say
    whether it now refuses them or what will make it."""
    server = NatsSettings(
        url=a.nats_url,
        tls_ca=a.nats_tls_ca,
        tls_cert=a.nats_tls_cert,
        tls_key=a.nats_tls_key,
        tls_hostname=a.nats_tls_hostname,
    )
    what = (
        f"Revoked the {replaced} credentials issued again here"
        if replaced
        else f"The {len(auth.revoked())} credentials revoked here earlier"
    )
    logs.configure_logging("warning", role="auth")  # what went wrong is said below, not as log lines
    try:
        added = logs.run(push_operator(auth, server))
    except PushError as e:
        return (
            f"{what}, but the running NATS may still accept them: {e}. NATS refuses them once a gateway that holds "
            f"{auth.path} pushes them (it looks for new revocations every {POLL:g} s), once this runs again with "
            "--nats-url of a server it can reach, or once the servers restart with this nats-auth.conf."
        )
    if replaced or added:
        return f"{what}: NATS at {server.url} refuses them now (it closed their connections)."
    return f"{what}: NATS at {server.url} refuses them."


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "init":
        print(
            "usage: tokenyard auth init --out DIR [--providers FILE] [--adapter openai=gpt-4o,gpt-4o-mini] "
            "[--local-worker] [--nats-url URL]",
            file=sys.stderr,
        )
        return 2
    a = parser().parse_args(argv[1:])
    if a.adapters:
        print(
            "tokenyard auth init: --adapters NAME is no longer accepted: credentials for any model of a pool could "
            "pull every pool's work (a consumer name cannot be matched in part). Name each adapter's models: "
            "--providers FILE (its provider config) or --adapter NAME=MODEL,...",
            file=sys.stderr,
        )
        return 2
    try:
        adapters = provider_models(a.providers) if a.providers else {}
        adapters.update(adapter_flags(a.adapter))
        earlier = AuthDir.open(a.out)
        revoked = set(earlier.revoked()) if earlier is not None else set()
        auth = AuthDir.init(a.out, adapters=adapters, local_worker=a.local_worker, resolver_dir=a.resolver_dir or None)
    except ValueError as e:  # a bad provider file or flag, or an adapter with more models than credentials hold
        print(f"tokenyard auth init: {e}", file=sys.stderr)
        return 2
    if auth.revoked():
        print(push_revocations(auth, a, replaced=len(set(auth.revoked()) - revoked)))
    print(f"NATS auth in {auth.path}:")
    print(f"  {auth.conf_path}   (include it from the nats-server config)")
    for creds_file in sorted((auth.path / "creds").glob("*.creds")):
        print(f"  {creds_file}")
    print(f"  {auth.path / KEYS_FILE}   (signing keys: the gateway issues node credentials with them; keep secret)")
    return 0
