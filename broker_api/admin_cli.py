"""`tokenyard keys | orgs | usage | audit | routing`: the admin API from the command line.

Talks HTTP to a running gateway (`--api-url`, default http://127.0.0.1:8000) with an admin key
(`--admin-key`, `TOKENYARD_ADMIN_KEY`, or the one `tokenyard up` keeps in the data dir).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from schemas.routing import STRATEGIES
from schemas.settings import add_setting
from schemas.tenancy import PRIORITY_TIERS

LIMIT_FLAGS = (
    "rpm",
    "tpm",
    "max_concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "usd_per_day",
    "usd_per_month",
    "max_tokens",
)


def _common(p: argparse.ArgumentParser) -> None:
    add_setting(p, "--api-url", default="http://127.0.0.1:8000", help="the gateway's base URL")
    add_setting(p, "--admin-key", default="", help="an admin API key")
    add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="where `up` keeps its admin key")


def _limits(p: argparse.ArgumentParser) -> None:
    for name in LIMIT_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float if name.startswith("usd") else int, default=None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenyard", description="Administer orgs, API keys, usage and audit.")
    sub = p.add_subparsers(dest="noun", required=True)
    keys = sub.add_parser("keys").add_subparsers(dest="verb", required=True)
    k = keys.add_parser("create", help="create a key (its secret is printed once)")
    _common(k)
    k.add_argument("name")
    k.add_argument("--org")
    k.add_argument("--project", default="")
    k.add_argument("--admin", action="store_true")
    k.add_argument("--model", action="append", dest="models", default=[], help="allowed model (repeatable)")
    k.add_argument("--priority", choices=PRIORITY_TIERS, default="standard")
    k.add_argument("--expires-in", type=float, help="seconds until the key expires")
    k.add_argument("--no-cache", action="store_true", help="never answer this key from the response cache")
    k.add_argument("--volunteer-ok", action="store_true", help="its jobs may run on idle-time volunteer nodes")
    _limits(k)
    for verb in ("list", "revoke"):
        v = keys.add_parser(verb)
        _common(v)
        if verb == "revoke":
            v.add_argument("key_id")
        else:
            v.add_argument("--org")
    orgs = sub.add_parser("orgs").add_subparsers(dest="verb", required=True)
    o = orgs.add_parser("create")
    _common(o)
    o.add_argument("name")
    o.add_argument("--project", action="append", dest="projects", default=[])
    _limits(o)
    _common(orgs.add_parser("list"))
    u = sub.add_parser("usage", help="usage and cost report")
    _common(u)
    u.add_argument("--by", default="model", choices=["model", "route", "key", "day", "org", "project"])
    u.add_argument("--since", type=float, help="unix time")
    u.add_argument("--until", type=float, help="unix time")
    u.add_argument("--format", default="table", choices=["table", "json", "csv"])
    u.add_argument("--export", action="store_true", help="every row, not the report")
    a = sub.add_parser("audit", help="the audit log")
    _common(a)
    a.add_argument("--since", type=float)
    a.add_argument("--format", default="table", choices=["table", "json", "csv"])
    r = sub.add_parser("routing", help="routing policies: default, per model, per key").add_subparsers(
        dest="verb", required=True
    )
    _common(r.add_parser("show"))
    for verb in ("set", "delete"):
        v = r.add_parser(verb)
        _common(v)
        v.add_argument("target", help="`default`, `model:<model id>` or `key:<key id>`")
        if verb == "set":
            v.add_argument("--strategy", choices=STRATEGIES, required=True)
            v.add_argument("--order", default="", help="pools in order, comma-separated (failover, ties)")
            v.add_argument(
                "--weight",
                action="append",
                default=[],
                metavar="POOL=W",
                help="weighted split (repeatable), e.g. --weight openai=0.9 --weight own=0.1",
            )
            v.add_argument("--spill-wait", type=float, help="own_first: seconds of predicted wait before spilling")
    return p


def _routing_path(target: str) -> str:
    if target == "default":
        return "/routing/default"
    scope, _, ident = target.partition(":")
    if scope in ("model", "key") and ident:
        return f"/routing/{scope}s/{quote(ident, safe='/')}"
    raise SystemExit("tokenyard: the target is `default`, `model:<model id>` or `key:<key id>`")


def _policy_of(args: argparse.Namespace) -> dict[str, Any]:
    policy: dict[str, Any] = {"strategy": args.strategy}
    if args.order:
        policy["order"] = [p.strip() for p in args.order.split(",") if p.strip()]
    weights = {}
    for item in args.weight:
        pool, _, w = item.partition("=")
        try:
            weights[pool] = float(w)
        except ValueError:
            pool = ""
        if not pool:
            raise SystemExit(f"tokenyard: --weight wants POOL=NUMBER, not {item!r}")
    if weights:
        policy["weights"] = weights
    if args.spill_wait is not None:
        policy["spill_wait"] = args.spill_wait
    return policy


def _admin_key(args: argparse.Namespace) -> str:
    if args.admin_key:
        return str(args.admin_key)
    path = Path(args.data_dir).expanduser() / "admin_key"
    if path.exists():
        return path.read_text().strip()
    raise SystemExit("tokenyard: no admin key: pass --admin-key or set TOKENYARD_ADMIN_KEY")


def _limits_of(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None}


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    cells = [
        [
            ("" if r.get(c) is None else json.dumps(r[c]) if isinstance(r.get(c), (dict, list)) else str(r[c]))
            for c in cols
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        r = httpx.request(
            method,
            args.api_url.rstrip("/") + "/v1/admin" + path,
            headers={"Authorization": f"Bearer {_admin_key(args)}"},
            timeout=30,
            **kw,
        )
    except httpx.HTTPError as e:
        raise SystemExit(f"tokenyard: cannot reach {args.api_url}: {e}") from e
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise SystemExit(f"tokenyard: {r.status_code}: {message}")
    return r


def _show(r: httpx.Response, fmt: str) -> None:
    if fmt == "csv":
        print(r.text, end="")
    elif fmt == "json":
        print(json.dumps(r.json(), indent=2))
    else:
        body = r.json()
        print(_table(body["data"] if "data" in body else [body]))


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.noun == "keys" and args.verb == "create":
        body = {
            "name": args.name,
            "project": args.project,
            "admin": args.admin,
            "models": args.models,
            "priority": args.priority,
            "limits": _limits_of(args),
            "cache": not args.no_cache,
            "volunteer_ok": args.volunteer_ok,
        }
        if args.org:
            body["org"] = args.org
        if args.expires_in:
            body["expires_in"] = args.expires_in
        created = _call(args, "POST", "/keys", json=body).json()
        print(f"key: {created['key']}\n(shown once; store it now)\nid:  {created['id']}  org: {created['org']}")
    elif args.noun == "keys" and args.verb == "list":
        _show(_call(args, "GET", "/keys", params={"org": args.org} if args.org else {}), "table")
    elif args.noun == "keys":
        _show(_call(args, "POST", f"/keys/{args.key_id}/revoke"), "table")
    elif args.noun == "orgs" and args.verb == "create":
        _show(
            _call(
                args, "POST", "/orgs", json={"name": args.name, "projects": args.projects, "limits": _limits_of(args)}
            ),
            "table",
        )
    elif args.noun == "orgs":
        _show(_call(args, "GET", "/orgs"), "table")
    elif args.noun == "usage":
        params: dict[str, Any] = {"format": "csv" if args.format == "csv" else "json"}
        params.update({k: v for k, v in (("since", args.since), ("until", args.until)) if v is not None})
        if not args.export:
            params["group_by"] = args.by
        _show(_call(args, "GET", "/usage/export" if args.export else "/usage", params=params), args.format)
    elif args.noun == "routing" and args.verb == "show":
        print(json.dumps(_call(args, "GET", "/routing").json(), indent=2))
    elif args.noun == "routing":
        path = _routing_path(args.target)
        r = _call(args, "PUT", path, json=_policy_of(args)) if args.verb == "set" else _call(args, "DELETE", path)
        print(json.dumps(r.json(), indent=2))
    else:
        params = {"format": "csv" if args.format == "csv" else "json"}
        if args.since is not None:
            params["since"] = args.since
        _show(_call(args, "GET", "/audit", params=params), args.format)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
