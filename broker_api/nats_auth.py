"""NATS authentication for a Tokenyard deployment: decentralized JWT auth, as NATS defines it.

`tokenyard auth init --out DIR` (its command line: `broker_api.auth_cli`) makes an operator, a
system account and the TOKENYARD account (every role's streams live in one account: JetStream
is per account), and writes:

- `DIR/nats-auth.conf`, to be `include`d by a nats-server config: the operator JWT, the system
  account, and NATS's own "full" resolver (account JWTs kept in a directory, updated at run time
  through `$SYS.REQ.CLAIMS.UPDATE`, kept across restarts) preloaded with both accounts;
- `DIR/creds/<role>.creds` for `api`, `scheduler`, `ledger`, `adapter-<provider>` per
  provider (`--providers FILE`, or `--adapter NAME=MODEL,...`: each may pull only its own
  models' work, as that file or flag names them), `worker` (the operator's own workers, any
  pool) with `--local-worker`, and `sys` (the system account's user: the gateway pushes
  revocations with it);
- `DIR/nats-keys.json` (mode 0600): the seeds a gateway needs later, to sign enrolled nodes'
  user JWTs (the account's) and to re-sign the account JWT with revocations (the operator's);
- `DIR/nats-revocations.json`: the operator's own revocations, the users of credentials this
  directory issued and later replaced (node revocations live in the node registry instead).

Every file with a secret is mode 0600. Running it again keeps the keys and writes only what is
missing, so credentials already handed out stay valid; an adapter's credentials are issued
again when its models changed, and the user of the file they replace is revoked: its grant may
have been wider (an adapter from `--adapters NAME` could pull every pool's work), and nothing
else would ever revoke it (adapters are not in the node registry). The account JWT preloaded in
`nats-auth.conf` carries those revocations, and they reach running servers at once
(`broker_api.revocations`): `auth init` pushes them itself when it can reach NATS, and every
gateway holding the directory pushes them with the nodes' when the revocations file changes
(and at its start and at every node change), so the old file is refused from then on.

A user JWT travels in the client's CONNECT line, and an enrolled node's names each of its
models' consumers (`schemas.permissions.node`: four subjects per model, which no NATS wildcard
can narrow to one model), so hundreds of long model ids make a JWT of hundreds of KiB. The
config raises nats-server's `max_control_line` to `MAX_CONTROL_LINE`, and `issue` refuses
credentials whose JWT would not fit it (`CredentialsTooLargeError`, before anything is handed
out): 256 models of 100 characters make ~230 KB, about a quarter of `MAX_USER_JWT`. The limit
is read from the directory's `nats-auth.conf` at each issue, since servers still configured by
an older `auth init` allow 64 KiB: a gateway must not hand a node credentials they refuse.

Why JWTs and not auth callout: the server verifies a JWT chain itself, so no Tokenyard process
sits on the connect path (NATS keeps accepting the scheduler and the workers while every gateway
is down), and revoking a user in the account JWT makes the server close that user's connections
at once and refuse them after (`Authorization Violation`), which is exactly "disable a node".
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker_api.nats_jwt import (
    ACCOUNT,
    OPERATOR,
    USER,
    Key,
    account_jwt,
    creds,
    decode_claims,
    operator_jwt,
    user_jwt,
)
from schemas import permissions
from schemas.permissions import Permissions
from schemas.settings import creds_path

KEYS_FILE = "nats-keys.json"
CONF_FILE = "nats-auth.conf"
REVOKED_FILE = "nats-revocations.json"
ACCOUNT_NAME = "TOKENYARD"
SYSTEM_NAME = "SYS"
SYS_ROLE = "sys"
LOCAL_WORKER = "worker"
MAX_CONTROL_LINE = 1 << 20  # nats-server's longest protocol line, as nats-auth.conf sets it (its default is 4 KiB)
# The longest user JWT issued: the CONNECT line around it (signature, name, versions) must fit
# MAX_CONTROL_LINE, and nats-io/jwt refuses any JWT past 1 MB (nats-server 2.15 took one of
# 973 KB and refused one of 991 KB).
MAX_USER_JWT = 900_000
PRELOAD_ISSUED = 1  # the preloaded account JWT's date while the operator revokes nothing: older than any push
OLD_CONTROL_LINE = 64 * 1024  # what a nats-auth.conf that names no max_control_line is taken to allow (older auth init)
CONNECT_MARGIN = 4096  # the rest of a CONNECT line: the nonce's signature, the client's name and versions
_JWT = re.compile(r"-----BEGIN NATS USER JWT-----\s*(\S+)\s*-+END NATS USER JWT-+")
_CONTROL_LINE = re.compile(r"^\s*max_control_line\s*[:=]?\s*(\d+)\s*(kb|k|mb|m)?\s*$", re.MULTILINE | re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2}  # as nats-server's config reads sizes


class CredentialsTooLargeError(ValueError):
    """Permissions whose user JWT would not fit the CONNECT line nats-server accepts."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        super().__init__(
            f"the NATS credentials of {name} would carry a {size}-byte user JWT, more than the {limit} bytes "
            "a NATS CONNECT line may hold"
        )
        self.size = size
        self.limit = limit


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner may read (0600), replacing any earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def role_permissions(role: str, models: tuple[str, ...] = ()) -> Permissions:
    """The permissions of a role's credentials (`adapter-<pool>` names its pool; `models`: the
    only ones such an adapter serves, empty: no work at all)."""
    fixed = {"api": permissions.api, "scheduler": permissions.scheduler, "ledger": permissions.ledger}
    if role in fixed:
        return fixed[role]()
    if role == LOCAL_WORKER:
        return permissions.adapter(None)
    if role.startswith("adapter-"):
        return permissions.adapter(role.removeprefix("adapter-"), models)
    raise ValueError(f"unknown role {role!r}")


@dataclass(frozen=True, slots=True)
class AuthKeys:
    operator: Key
    system: Key
    account: Key

    @classmethod
    def create(cls) -> AuthKeys:
        return cls(Key.new(OPERATOR), Key.new(ACCOUNT), Key.new(ACCOUNT))

    def to_json(self) -> str:
        seeds = {"operator": self.operator.seed, "system": self.system.seed, "account": self.account.seed}
        return json.dumps({"version": 1, **{k: v.decode() for k, v in seeds.items()}}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AuthKeys:
        o = json.loads(text)
        return cls(Key(o["operator"].encode()), Key(o["system"].encode()), Key(o["account"].encode()))


class AuthDir:
    """A directory written by `tokenyard auth init`: keys, server config, role credentials."""

    def __init__(self, path: Path, keys: AuthKeys) -> None:
        self.path = path
        self.keys = keys

    @classmethod
    def open(cls, path: str | Path) -> AuthDir | None:
        """The auth dir at `path`, or None where no keys were made there."""
        p = Path(path).expanduser()
        keys = p / KEYS_FILE
        return cls(p, AuthKeys.from_json(keys.read_text())) if keys.is_file() else None

    @classmethod
    def init(
        cls,
        path: str | Path,
        *,
        adapters: Mapping[str, tuple[str, ...]] | None = None,
        local_worker: bool = False,
        resolver_dir: str | Path | None = None,
    ) -> AuthDir:
        """`adapters`: provider name -> the models it serves, the only work its credentials
        may pull (`schemas.permissions.adapter`). Raises `CredentialsTooLargeError` for an
        adapter with more models than its credentials can name."""
        p = Path(path).expanduser().resolve()
        found = cls.open(p)
        auth = found or cls(p, AuthKeys.create())
        if found is None:
            write_secret(p / KEYS_FILE, auth.keys.to_json())
        store = Path(resolver_dir) if resolver_dir else p / "jwt"
        (p / CONF_FILE).write_text(auth.server_config(store))  # first: what it allows bounds what is issued
        served = adapters or {}
        roles = {"api": (), "scheduler": (), "ledger": (), **{f"adapter-{a}": tuple(m) for a, m in served.items()}}
        if local_worker:
            roles[LOCAL_WORKER] = ()
        replaced: dict[str, int] = {}
        for role, models in roles.items():
            perms = role_permissions(role, models)
            file = creds_path(p, role)
            if not file.exists() or (role.startswith("adapter-") and issued_publish(file) != list(perms.publish)):
                earlier = issued_user(file) if file.exists() else None
                write_secret(file, auth.issue(role, perms)[0])
                if earlier is not None:
                    replaced[earlier] = int(time.time())
        if replaced:
            auth.revoke(replaced)
            (p / CONF_FILE).write_text(auth.server_config(store))
        if not creds_path(p, SYS_ROLE).exists():
            user = Key.new(USER)
            jwt = user_jwt(auth.keys.system, user.public, name=SYS_ROLE, permissions=None)
            write_secret(creds_path(p, SYS_ROLE), creds(jwt, user.seed))
        return auth

    @property
    def conf_path(self) -> Path:
        return self.path / CONF_FILE

    @property
    def sys_creds(self) -> Path:
        return creds_path(self.path, SYS_ROLE)

    @property
    def revocations_path(self) -> Path:
        return self.path / REVOKED_FILE

    def revoked(self) -> dict[str, int]:
        """The operator's revocations (user public key -> the time its credentials stopped), read
        now: `auth init` may add some while a gateway runs. Raises ValueError for a damaged file."""
        path = self.revocations_path
        if not path.is_file():
            return {}
        try:
            found = json.loads(path.read_text())["revoked"]
            return {str(k): int(v) for k, v in found.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a revocations file ({e})") from e

    def revoke(self, users: Mapping[str, int]) -> None:
        """Add these users to the operator's revocations (kept for good: a revoked key is never
        issued again, and its old file must stay refused)."""
        merged = {**self.revoked(), **users}
        write_secret(self.revocations_path, json.dumps({"version": 1, "revoked": merged}, indent=2) + "\n")

    def max_user_jwt(self) -> int:
        """The longest user JWT servers configured by this directory's `nats-auth.conf` accept:
        its `max_control_line` (`OLD_CONTROL_LINE` where it names none) less a CONNECT line's
        other fields, and never more than `MAX_USER_JWT`."""
        try:
            found = _CONTROL_LINE.search(self.conf_path.read_text())
        except OSError:
            found = None
        line = int(found.group(1)) * _UNITS[(found.group(2) or "").lower()] if found else OLD_CONTROL_LINE
        return min(MAX_USER_JWT, line - CONNECT_MARGIN)

    def issue(self, name: str, perms: Permissions, *, issued_at: int = 0) -> tuple[str, str]:
        """A new identity in the TOKENYARD account: its `.creds` text and public key. Raises
        `CredentialsTooLargeError` where its JWT would not fit a CONNECT line."""
        user = Key.new(USER)
        jwt = user_jwt(self.keys.account, user.public, name=name, permissions=perms, issued_at=issued_at)
        if len(jwt) > (limit := self.max_user_jwt()):
            raise CredentialsTooLargeError(name, len(jwt), limit)
        return creds(jwt, user.seed), user.public

    def account_jwt(self, revocations: dict[str, int] | None = None, *, issued_at: int = 0) -> str:
        """The TOKENYARD account's JWT, issued at `issued_at` (0: now), with these users revoked."""
        return account_jwt(
            self.keys.operator,
            self.keys.account.public,
            name=ACCOUNT_NAME,
            jetstream=True,
            revocations=revocations,
            issued_at=issued_at or int(time.time()),
        )

    def server_config(self, resolver_dir: Path) -> str:
        k = self.keys
        operator = operator_jwt(k.operator, name="tokenyard", system_account=k.system.public)
        system = account_jwt(k.operator, k.system.public, name=SYSTEM_NAME, jetstream=False)
        # A server's resolver keeps the newer of its stored account JWT and this one: dated by the
        # last operator revocation (not by now), it never displaces what a gateway pushed since
        # (the nodes' revocations too) when auth init merely runs again and the servers restart.
        revoked = self.revoked()
        account = self.account_jwt(revoked, issued_at=max(revoked.values(), default=PRELOAD_ISSUED))
        store = str(resolver_dir).replace("\\", "/")
        return (
            "# NATS decentralized JWT auth for Tokenyard (written by `tokenyard auth init`): include it\n"
            "# from a nats-server config. Account updates (revocations) arrive at run time and are kept\n"
            "# in the resolver's directory, which must be this server's own.\n"
            "# A user JWT travels in the CONNECT line: a node enrolled for many models has a long one.\n"
            f"max_control_line: {MAX_CONTROL_LINE}\n"
            f'operator: "{operator}"\n'
            f"system_account: {k.system.public}\n"
            f'resolver: {{\n  type: full\n  dir: "{store}"\n  allow_delete: false\n  interval: "2m"\n'
            '  timeout: "1.9s"\n}\n'
            f'resolver_preload: {{\n  {k.system.public}: "{system}"\n  {k.account.public}: "{account}"\n}}\n'
        )


def issued_user(path: Path) -> str | None:
    """The user public key of the credentials at `path` (None: unreadable)."""
    found = _JWT.search(path.read_text())
    if found is None:
        return None
    try:
        sub = decode_claims(found.group(1))["sub"]
    except (ValueError, KeyError, IndexError):
        return None
    return sub if isinstance(sub, str) and sub.startswith("U") else None


def issued_publish(path: Path) -> list[str] | None:
    """What the credentials at `path` may publish, as their user JWT says (None: unreadable)."""
    found = _JWT.search(path.read_text())
    if found is None:
        return None
    try:
        allow = decode_claims(found.group(1))["nats"].get("pub", {}).get("allow")
    except (ValueError, KeyError, AttributeError):
        return None
    return list(allow) if isinstance(allow, list) else None
