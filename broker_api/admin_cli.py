"""`tokenyard keys | orgs | usage | audit | routing | nodes`: the admin API from the command line.

Talks HTTP to a running gateway with an admin key. The gateway: `--api-url`
(`TOKENYARD_API_URL`), else the one a local `tokenyard up` runs (it writes its URL to
`<data dir>/api_url`), else http://127.0.0.1:8000. The key: `--admin-key`
(`TOKENYARD_ADMIN_KEY`), else the one `tokenyard up` keeps in the data dir. These global flags
go anywhere: `tokenyard --api-url URL keys list` and `tokenyard keys list --api-url URL`.
Tables show local times and fixed-point costs; `--format json|csv` keeps the raw values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from broker_api.tables import table
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


DEFAULT_API_URL = "http://127.0.0.1:8000"
GLOBAL_FLAGS = ("--api-url", "--admin-key", "--data-dir")


def _global(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The global flags: with their defaults on the top parser, and again on every command,
    where they default to nothing (argparse.SUPPRESS), so `tokenyard --api-url X keys list`
    and `tokenyard keys list --api-url X` both work and neither overrides the other."""
    if top:
        add_setting(
            p, "--api-url", default="", help=f"the gateway's base URL (default: `up`'s, else {DEFAULT_API_URL})"
        )
        add_setting(p, "--admin-key", default="", help="an admin API key (default: the one `up` keeps)")
        add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="the data dir of `tokenyard up`")
        return
    for flag in GLOBAL_FLAGS:
        p.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _common(p: argparse.ArgumentParser) -> None:
    _global(p, top=False)


def _limits(p: argparse.ArgumentParser) -> None:
    for name in LIMIT_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float if name.startswith("usd") else int, default=None)


def _key_options(k: argparse.ArgumentParser, *, update: bool) -> None:
    """What `keys create` sets and `keys update` changes (an option not given: unchanged)."""
    k.add_argument("--project", default=None if update else "")
    if update:
        k.add_argument("--name")
        k.add_argument("--model", action="append", dest="models", default=None, help="allowed model (repeatable)")
        k.add_argument("--priority", choices=PRIORITY_TIERS, default=None)
        k.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None, help="may use the cache")
        k.add_argument("--volunteer-ok", action=argparse.BooleanOptionalAction, default=None)
    else:
        k.add_argument("--model", action="append", dest="models", default=[], help="allowed model (repeatable)")
        k.add_argument("--priority", choices=PRIORITY_TIERS, default="standard")
    _limits(k)


def _noun(sub: Any, name: str, **kw: Any) -> Any:
    """A noun's parser (with the global flags) and its verbs' subparsers."""
    p = sub.add_parser(name, **kw)
    _common(p)
    return p.add_subparsers(dest="verb", required=True)


def _keys_parser(sub: Any) -> None:
    keys = _noun(sub, "keys")
    k = keys.add_parser("create", help="create a key (its secret is printed once)")
    _common(k)
    k.add_argument("name")
    k.add_argument("--org")
    k.add_argument("--admin", action="store_true")
    k.add_argument("--expires-in", type=float, help="seconds until the key expires")
    k.add_argument("--no-cache", action="store_true", help="never answer this key from the response cache")
    k.add_argument("--volunteer-ok", action="store_true", help="its jobs may run on idle-time volunteer nodes")
    _key_options(k, update=False)
    ku = keys.add_parser("update", help="change a key: only the options given change (a limit of 0 lifts it)")
    _common(ku)
    ku.add_argument("key_id")
    _key_options(ku, update=True)
    for verb in ("list", "revoke", "rotate"):
        v = keys.add_parser(verb, help="a new secret for the key, printed once" if verb == "rotate" else None)
        _common(v)
        if verb == "list":
            v.add_argument("--org")
        else:
            v.add_argument("key_id")


def _orgs_parser(sub: Any) -> None:
    orgs = _noun(sub, "orgs")
    o = orgs.add_parser("create")
    _common(o)
    o.add_argument("name")
    o.add_argument("--project", action="append", dest="projects", default=[])
    _limits(o)
    ou = orgs.add_parser("update", help="change an org: only the options given change (a limit of 0 lifts it)")
    _common(ou)
    ou.add_argument("org_id")
    ou.add_argument("--name")
    ou.add_argument("--project", action="append", dest="projects", default=None, help="the org's projects (all)")
    _limits(ou)
    _common(orgs.add_parser("list"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenyard", description="Administer orgs, API keys, usage and audit.")
    _global(p, top=True)
    sub = p.add_subparsers(dest="noun", required=True)
    _keys_parser(sub)
    _orgs_parser(sub)
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
    r = _noun(sub, "routing", help="routing policies: default, per model, per key")
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
    _nodes_parser(sub)
    return p


def _nodes_parser(sub: Any) -> None:
    verbs = _noun(sub, "nodes", help="enrolled nodes: tokens, registry, disable/enable/remove, price")
    token = verbs.add_parser("token", help="enrolment tokens")
    _common(token)
    t = token.add_subparsers(dest="token_verb", required=True)
    c = t.add_parser("create", help="a token a machine joins with (printed once)")
    _common(c)
    c.add_argument("--pool", default="own", help="the pool the node will serve in")
    c.add_argument("--kind", default="own", choices=["own", "volunteer"])
    c.add_argument("--models", default="", help="models it may serve, comma-separated (default: what it serves)")
    c.add_argument("--ttl", default="24h", help="how long the token is valid: 3600, 30m, 24h, 7d")
    c.add_argument("--uses", type=int, default=1, help="machines that may join with it")
    c.add_argument("--org", help="the owner org (the operator's key only; default: the key's own org)")
    _common(t.add_parser("list"))
    for verb in ("list", "show", "disable", "enable", "remove", "price"):
        v = verbs.add_parser(verb)
        _common(v)
        if verb != "list":
            v.add_argument("node_id")
        if verb in ("list", "show"):
            v.add_argument("--format", default="table", choices=["table", "json"])
        if verb == "price":
            v.add_argument("--input", type=float, required=True, help="USD per million prompt tokens")
            v.add_argument("--output", type=float, required=True, help="USD per million completion tokens")


def parse_duration(text: str) -> float:
    """Seconds in `3600`, `90s`, `30m`, `24h` or `7d`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError as e:
        raise SystemExit(f"tokenyard: not a duration: {text!r} (e.g. 3600, 30m, 24h, 7d)") from e


def _node_row(node: dict[str, Any]) -> dict[str, Any]:
    hw = node.get("hardware") or {}
    seen = node.get("last_seen")
    return {
        "id": node["id"],
        "org": node["org"],
        "pool": node["pool"],
        "kind": node["kind"],
        "state": node["state"],
        "models": ",".join(node["models"]),
        "hardware": hw.get("summary", ""),
        "slots used/free": f"{node['slots']['used']}/{node['slots']['free']}",
        "requests": node["requests"],
        "tokens": node["tokens"],
        "last seen": f"{max(0, int(time.time() - seen))}s ago" if seen else "never",
    }


def _nodes(args: argparse.Namespace) -> None:
    if args.verb == "token" and args.token_verb == "create":
        body: dict[str, Any] = {
            "pool": args.pool,
            "kind": args.kind,
            "models": [m.strip() for m in args.models.split(",") if m.strip()],
            "ttl": parse_duration(args.ttl),
            "uses": args.uses,
        }
        if args.org:
            body["org"] = args.org
        t = _call(args, "POST", "/nodes/tokens", json=body).json()
        print(f"token: {t['token']}\n(shown once; store it now)")
        print(f"pool: {t['pool']}  kind: {t['kind']}  uses: {t['uses']}  expires: {time.ctime(t['expires'])}")
        print(f"on the machine: tokenyard worker join --server {t.get('server') or args.api_url} --token {t['token']}")
    elif args.verb == "token":
        _show(_call(args, "GET", "/nodes/tokens"), "table")
    elif args.verb == "list":
        r = _call(args, "GET", "/nodes")
        print(
            json.dumps(r.json(), indent=2) if args.format == "json" else table([_node_row(n) for n in r.json()["data"]])
        )
    elif args.verb == "show":
        node = _call(args, "GET", f"/nodes/{args.node_id}").json()
        usage = _call(args, "GET", f"/nodes/{args.node_id}/usage").json()["data"]
        if args.format == "json":
            print(json.dumps({**node, "usage": usage}, indent=2))
        else:
            print(table([_node_row(node)]))
            print(f"price (USD per 1M tokens): input {node['price']['input']}, output {node['price']['output']}")
            print("served:\n" + table(usage))
    elif args.verb == "price":
        body = {"price": {"input": args.input, "output": args.output}}
        print(table([_node_row(_call(args, "PATCH", f"/nodes/{args.node_id}", json=body).json())]))
    elif args.verb == "remove":
        _call(args, "DELETE", f"/nodes/{args.node_id}")
        print(f"node {args.node_id} removed; its credentials are revoked")
    else:
        print(table([_node_row(_call(args, "POST", f"/nodes/{args.node_id}/{args.verb}").json())]))


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


def api_url(configured: str, data_dir: str) -> str:
    """The gateway to talk to: the one configured, else a local `tokenyard up`'s, else the default."""
    if configured:
        return configured.rstrip("/")
    path = Path(data_dir).expanduser() / "api_url"
    try:
        written = path.read_text().strip()
    except OSError:
        written = ""
    return (written or DEFAULT_API_URL).rstrip("/")


def _limits_of(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None}


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> httpx.Response:
    base = api_url(args.api_url, args.data_dir)
    try:
        r = httpx.request(
            method,
            base + "/v1/admin" + path,
            headers={"Authorization": f"Bearer {_admin_key(args)}"},
            timeout=30,
            **kw,
        )
    except httpx.HTTPError as e:
        raise SystemExit(f"tokenyard: cannot reach {base}: {e} (is the gateway running? --api-url says where)") from e
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
        print(table(body["data"] if "data" in body else [body]))


def _keys(args: argparse.Namespace) -> None:
    if args.verb == "create":
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
    elif args.verb == "list":
        _show(_call(args, "GET", "/keys", params={"org": args.org} if args.org else {}), "table")
    elif args.verb == "update":
        fields = ("name", "project", "models", "priority", "cache", "volunteer_ok")
        patch: dict[str, Any] = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
        if _limits_of(args):
            patch["limits"] = _limits_of(args)
        if not patch:
            raise SystemExit("tokenyard: nothing to change: give the options to update (see --help)")
        _show(_call(args, "PATCH", f"/keys/{args.key_id}", json=patch), "table")
    elif args.verb == "rotate":
        rotated = _call(args, "POST", f"/keys/{args.key_id}/rotate").json()
        print(
            f"key: {rotated['key']}\n(shown once; store it now: the old secret no longer works)\nid:  {rotated['id']}"
        )
    else:
        _show(_call(args, "POST", f"/keys/{args.key_id}/revoke"), "table")


def _orgs(args: argparse.Namespace) -> None:
    if args.verb == "create":
        body = {"name": args.name, "projects": args.projects, "limits": _limits_of(args)}
        _show(_call(args, "POST", "/orgs", json=body), "table")
    elif args.verb == "update":
        patch: dict[str, Any] = {"limits": _limits_of(args)} if _limits_of(args) else {}
        if args.name:
            patch["name"] = args.name
        if args.projects is not None:
            patch["projects"] = args.projects
        if not patch:
            raise SystemExit("tokenyard: nothing to change: give the options to update (see --help)")
        _show(_call(args, "PATCH", f"/orgs/{args.org_id}", json=patch), "table")
    else:
        _show(_call(args, "GET", "/orgs"), "table")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.noun == "keys":
        _keys(args)
    elif args.noun == "orgs":
        _orgs(args)
    elif args.noun == "usage":
        params: dict[str, Any] = {"format": "csv" if args.format == "csv" else "json"}
        params.update({k: v for k, v in (("since", args.since), ("until", args.until)) if v is not None})
        if not args.export:
            params["group_by"] = args.by
        _show(_call(args, "GET", "/usage/export" if args.export else "/usage", params=params), args.format)
    elif args.noun == "nodes":
        _nodes(args)
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
