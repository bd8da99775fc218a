"""`tokenyard`: one command for every role.

    tokenyard up          the whole local stack (embedded NATS, scheduler, API, one worker)
    tokenyard api         the OpenAI-compatible gateway
    tokenyard scheduler   admission and placement
    tokenyard worker      a worker (transformers, echo or cloud backend)
    tokenyard ledger      the usage ledger and audit log (SQLite, or PostgreSQL with --database-url)

    tokenyard top         a live view of queues, nodes, throughput, TTFT, errors and breakers

    tokenyard keys create|list|update|rotate|revoke    API keys (through the admin API)
    tokenyard orgs create|list|update                  orgs
    tokenyard usage [--by model|route|key|day] [--format table|json|csv] [--export]
    tokenyard audit                      the audit log
    tokenyard routing show|set|delete    routing policies (default, per model, per key)
    tokenyard nodes token create --pool P --kind own|volunteer [--models a,b] [--ttl 24h] [--uses N]
    tokenyard nodes list|show|disable|enable|remove|price   enrolled nodes
    tokenyard worker join --server URL --token T [worker flags]   enrol this machine, then serve
    tokenyard auth init --out DIR [--providers FILE]   NATS credentials for a deployment

The admin commands and `top` talk to a running gateway: a local `tokenyard up` by default, or
`--api-url URL` (with `--admin-key`, `--data-dir`), before or after the command.

Each role runs as its own Python process (`python -m <package>`): the CLI starts it and does
not import its internals, so the same code runs as separate processes on many machines.
"""

from __future__ import annotations

import os
import sys

ROLES = {"api": "broker_api", "scheduler": "scheduler", "worker": "worker", "ledger": "broker_api.ledger_main"}
ADMIN = frozenset({"keys", "orgs", "usage", "audit", "routing", "nodes"})
GLOBAL_FLAGS = ("--api-url", "--admin-key", "--data-dir")  # of the admin commands and top
USAGE = __doc__ or ""


def command_of(args: list[str]) -> tuple[str, list[str]]:
    """The command and the rest, with global flags given before the command moved after it
    (`tokenyard --api-url X keys list` is `tokenyard keys list --api-url X`)."""
    leading: list[str] = []
    i = 0
    while i < len(args) and args[i].split("=", 1)[0] in GLOBAL_FLAGS:
        step = 1 if "=" in args[i] else 2
        leading += args[i : i + step]
        i += step
    if i >= len(args):
        return "", leading
    return args[i], [*args[i + 1 :], *leading]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE.strip())
        print("\n`tokenyard <role> --help` lists a role's settings (flags and TOKENYARD_* variables).")
        raise SystemExit(0 if args else 2)
    role, rest = command_of(args)
    if role == "up":
        from broker_api.launcher import main as up

        raise SystemExit(up(rest))
    if role == "auth":
        from broker_api.auth_cli import main as auth

        raise SystemExit(auth(rest))
    if role in ADMIN:
        from broker_api.admin_cli import main as admin

        raise SystemExit(admin([role, *rest]))
    if role == "top":
        from broker_api.top import main as top

        raise SystemExit(top(rest))
    if role in ROLES:
        os.execv(sys.executable, [sys.executable, "-m", ROLES[role], *rest])
    if role in {"--version", "version"}:
        from importlib.metadata import version

        print(f"tokenyard {version('tokenyard')}")
        raise SystemExit(0)
    print(f"tokenyard: unknown command {role!r}\n\n{USAGE.strip()}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":  # `python -m broker_api.cli ...` as well as the `tokenyard` script
    main()
