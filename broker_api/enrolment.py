"""Enrolling nodes and cutting them off: tokens, joins, and the NATS credentials behind them.

- An admin makes an enrolment token for a pool, a kind and (optionally) models; the secret is
  shown once. Pools that belong to the operator (a cloud provider's, or any in
  `--reserved-pools`) take no enrolled nodes.
- A machine joins with it (`POST /v1/nodes/join`, no API key: the token is the credential;
  attempts per client address are rate-limited): it gets a stable node id and its own NATS user
  credentials, scoped by `schemas.permissions.node` to its pool, models and kind, signed with
  the account key from the auth dir (`broker_api.nats_auth`). The registry records it. A node
  whose models would make credentials too long for a NATS connect is refused (400) before its
  token is spent: too long for the `max_control_line` of the auth dir's `nats-auth.conf`, so
  servers still on an older config's 64 KiB never get a node they would refuse.
- Disabling or removing a node revokes its NATS user in the account JWT and pushes that JWT to
  the servers' resolver (`$SYS.REQ.CLAIMS.UPDATE`, as the system account's user): nats-server
  closes its connections at once and refuses them after. Enabling lifts the revocation, so the
  node's stored credentials work again the next time it connects.
- A push replaces the whole account JWT, and gateways change nodes concurrently: a push built
  from a registry read before another gateway's change can land after that gateway's push and
  undo it. So every push is checked: read back what the servers hold and the registry as of
  now (its mirror caught up), and push again until they agree. The last gateway to push sees
  every change made before its push, so the servers end up revoking exactly the registry's.
- Every push also carries the operator's own revocations (`AuthDir.revoked`: credentials that
  `tokenyard auth init` replaced, such as an adapter's whose models changed), read from the auth
  dir at each push; a gateway starts by pushing when there is anything to revoke, so credentials
  replaced while it was down are refused once it is up, and pushes again whenever that file
  changes (`broker_api.revocations.RevocationWatch`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from broker_api.nats_auth import AuthDir, CredentialsTooLargeError
from broker_api.nats_jwt import decode_claims
from broker_api.registry import INVALID_TOKEN, NodeRegistry
from schemas import subjects
from schemas.errors import AuthenticationError, InvalidRequestError, NoCapacityError, RateLimitError
from schemas.logs import close_quietly
from schemas.permissions import node as node_permissions
from schemas.registry import EnrolledKind, EnrolToken, NodeRecord, allowed_models
from schemas.settings import NatsSettings, nats_options

log = structlog.get_logger(__name__)

PUSH_TIMEOUT = 2.0
CONNECT_ONCE_TIMEOUT = 3.0
PRELOAD_WAIT_MAX = 2.0  # the longest a push waits to be dated after the preload (a clock behind the revoker's: go on)
SYNC_ROUNDS = 20  # pushes one change may take to converge with the other gateways' (each round ~ms)
RATE_WINDOW = 60.0
RATE_ADDRESSES = 10_000  # client addresses remembered by the join limiter


class Credentials:
    """The NATS side of enrolment: sign a node's user JWT, push the account's revocations."""

    def __init__(self, auth: AuthDir, system: NATS) -> None:
        self._auth = auth
        self._system = system

    @classmethod
    async def open(cls, auth: AuthDir, nats_settings: NatsSettings, *, once: bool = False) -> Credentials:
        """Connect as the system account's user (the auth dir's `creds/sys.creds`). `once`: try
        each server twice at most and raise what stopped the last try (a command line's
        answer), instead of retrying for ever as a gateway does."""
        settings = NatsSettings(
            url=nats_settings.url,
            creds=str(auth.sys_creds),
            tls_ca=nats_settings.tls_ca,
            tls_cert=nats_settings.tls_cert,
            tls_key=nats_settings.tls_key,
            tls_hostname=nats_settings.tls_hostname,
        )
        options = nats_options(settings, name="tokenyard-api-system")
        if not once:
            return cls(auth, await nats.connect(**options))
        seen: list[Exception] = []

        async def note(e: Exception) -> None:  # nats-py's report of each failed attempt, said by the caller instead
            seen.append(e)

        # max_reconnect_attempts=1: nats-py tries each server twice before it gives up on a first connect
        options.update(allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=CONNECT_ONCE_TIMEOUT)
        try:
            return cls(auth, await nats.connect(**options, error_cb=note))
        except nats.errors.NoServersError as e:
            raise (seen[-1] if seen else e) from e

    async def close(self) -> None:
        await close_quietly(self._system)

    def _operator(self) -> dict[str, int]:
        try:
            return self._auth.revoked()
        except ValueError as e:
            log.error("nodes.revocations_unreadable", error=str(e))
            raise NoCapacityError("The auth dir's revocations cannot be read; see the gateway's log.") from e

    def revoking(self, nodes: dict[str, int]) -> dict[str, int]:
        """Every user the servers must refuse: these nodes' and the operator's own revocations."""
        return {**self._operator(), **nodes}

    def issue_node(self, node_id: str, pool: str, models: tuple[str, ...]) -> tuple[str, str]:
        """A node's `.creds` text and its user's public key."""
        return self._auth.issue(f"node-{node_id}", node_permissions(node_id, pool, models))

    async def held(self) -> dict[str, int]:
        """The revocations in the account JWT the servers hold now."""
        account = self._auth.keys.account.public
        try:
            reply = await self._system.request(subjects.sys_claims_lookup(account), b"", timeout=PUSH_TIMEOUT)
            revocations = decode_claims(reply.data.decode())["nats"].get("revocations") or {}
        except (nats.errors.Error, ValueError, KeyError, IndexError) as e:
            raise NoCapacityError("NATS did not say which credentials it refuses; try again.") from e
        return {str(k): int(v) for k, v in revocations.items()}

    async def push(self, revocations: dict[str, int]) -> None:
        """Replace the account's JWT on the servers with one that revokes these users."""
        # A server restarted on nats-auth.conf keeps the newer of the account JWT it stored and
        # the one preloaded there (dated by the operator's last revocation), the preload on a tie:
        # a push dated that same second would be lost at the restart, the nodes' revocations with it.
        wait = max(self._operator().values(), default=0) + 1 - time.time()
        if wait > 0:
            await asyncio.sleep(min(wait, PRELOAD_WAIT_MAX))
        jwt = self._auth.account_jwt(revocations)
        try:
            reply = await self._system.request(subjects.SYS_CLAIMS_UPDATE, jwt.encode(), timeout=PUSH_TIMEOUT)
        except nats.errors.Error as e:
            raise NoCapacityError("NATS did not confirm the credentials change; try again.") from e
        answer = json.loads(reply.data)
        code = (answer.get("data") or {}).get("code") or (answer.get("error") or {}).get("code")
        if code != 200:
            log.error("nodes.push_refused", answer=answer)
            raise NoCapacityError("NATS refused the credentials change.")
        log.info("nodes.revocations_pushed", revoked=len(revocations))


def _too_many_models(count: int, e: CredentialsTooLargeError) -> InvalidRequestError:
    return InvalidRequestError(
        f"A node with these {count} models would need NATS credentials of {e.size} bytes, more than NATS accepts "
        f"when a node connects ({e.limit}). Enrol it for fewer models, or with shorter model ids.",
        param="models",
        code="too_many_models",
    )


class JoinLimiter:
    """At most `rate` join attempts per client address per minute (a token's secret is 256
    bits, so guessing is hopeless anyway; this keeps a scan from costing us)."""

    def __init__(self, rate: int) -> None:
        self._rate = max(1, rate)
        self._seen: dict[str, deque[float]] = {}

    def check(self, address: str, now: float) -> None:
        times = self._seen.pop(address, None) or deque()
        while times and now - times[0] > RATE_WINDOW:
            times.popleft()
        self._seen[address] = times  # re-inserted last: the least recent address is dropped first
        if len(self._seen) > RATE_ADDRESSES:
            del self._seen[next(iter(self._seen))]
        if len(times) >= self._rate:
            raise RateLimitError(
                "Too many join attempts from this address; wait a minute.",
                retry_after=RATE_WINDOW - (now - times[0]),
            )
        times.append(now)


@dataclass(frozen=True, slots=True)
class Joined:
    node: NodeRecord
    creds: str  # the node's NATS credentials: sent once, never stored here


class Enrolment:
    def __init__(
        self,
        registry: NodeRegistry,
        credentials: Credentials | None,
        *,
        reserved: frozenset[str],
        cloud_pools: Callable[[], set[str]],
        join_rate: int,
    ) -> None:
        self.registry = registry
        self._credentials = credentials
        self._reserved = reserved
        self._cloud_pools = cloud_pools  # what the gateway saw cloud adapters serve (FleetWatch)
        self.limiter = JoinLimiter(join_rate)

    def _need_credentials(self) -> Credentials:
        if self._credentials is None:
            raise NoCapacityError(
                "This gateway cannot issue NATS credentials: it has no auth dir (`tokenyard auth init`, "
                "or the data dir of `tokenyard up`; see --nats-auth-dir)."
            )
        return self._credentials

    def check_pool(self, pool: str) -> None:
        if pool in self._reserved or pool in self._cloud_pools():
            raise InvalidRequestError(
                f"The pool '{pool}' is the operator's (a cloud provider's or a reserved pool): nodes may not join it.",
                param="pool",
            )

    async def create_token(
        self, *, org: str, pool: str, kind: EnrolledKind, models: tuple[str, ...], ttl: float, uses: int, creator: str
    ) -> tuple[str, EnrolToken]:
        credentials = self._need_credentials()
        self.check_pool(pool)
        try:  # a token whose models no node could connect with is refused now, not at each join
            credentials.issue_node(self.registry.new_node_id(), pool, models)
        except CredentialsTooLargeError as e:
            raise _too_many_models(len(models), e) from e
        now = time.time()
        template = EnrolToken(
            id="",
            digest="",
            org=org,
            pool=pool,
            kind=kind,
            models=models,
            created=now,
            expires=now + ttl,
            uses=uses,
            creator=creator,
        )
        return await self.registry.create_token(template)

    async def join(self, secret: str, *, models: tuple[str, ...], name: str) -> Joined:
        token = self.registry.verify(secret)
        if token is None:
            raise AuthenticationError(INVALID_TOKEN, code="invalid_token")
        credentials = self._need_credentials()
        code, why = token.unusable(time.time())
        if code:
            raise AuthenticationError(why, code=code)
        self.check_pool(token.pool)
        allowed = allowed_models(token.models, models)
        if not allowed:
            raise InvalidRequestError(
                f"This token allows the models {', '.join(token.models)}; this node serves {', '.join(models)}."
                if token.models
                else "Say which models this node serves (the token names none): the worker's --models.",
                param="models",
            )
        node_id = self.registry.new_node_id()
        try:  # before the token is spent: a node refused here may join again with fewer models
            creds, user_key = credentials.issue_node(node_id, token.pool, allowed)
        except CredentialsTooLargeError as e:
            raise _too_many_models(len(allowed), e) from e
        await self.registry.spend(token)
        record = NodeRecord(
            id=node_id,
            org=token.org,
            pool=token.pool,
            kind=token.kind,
            models=allowed,
            created=time.time(),
            user_key=user_key,
            token=token.id,
            name=name[:200],
        )
        await self.registry.put_node(record)
        log.info("nodes.joined", node=node_id, org=record.org, pool=record.pool, kind=record.kind)
        return Joined(record, creds)

    async def set_enabled(self, record: NodeRecord, enabled: bool) -> NodeRecord:
        if record.enabled == enabled:
            return record
        updated = record.replace(enabled=enabled, changed=time.time())
        await self.registry.put_node(updated)
        await self.sync()
        return updated

    async def remove(self, record: NodeRecord) -> NodeRecord:
        removed = record.replace(removed=time.time(), changed=record.changed if record.revoked else time.time())
        await self.registry.put_node(removed)
        await self.sync()
        return removed

    def revokes_any(self) -> bool:
        """Whether the servers must refuse anyone (as far as this gateway's registry knows yet)."""
        credentials = self._credentials
        return credentials is not None and bool(credentials.revoking(self.registry.revocations()))

    async def sync(self) -> None:
        """Make the servers' account JWT revoke exactly the registry's disabled and removed nodes
        and the operator's revocations (converging with the other gateways' pushes: see the
        module's note)."""
        if self._credentials is None:
            return
        wanted = self._credentials.revoking(await self.registry.current_revocations())
        for _ in range(SYNC_ROUNDS):
            await self._credentials.push(wanted)
            held = await self._credentials.held()
            wanted = self._credentials.revoking(await self.registry.current_revocations())
            if held == wanted:
                return
            log.info("nodes.revocations_raced", held=len(held), wanted=len(wanted))
        raise NoCapacityError("The credentials change kept racing other changes; try again.")

    async def close(self) -> None:
        if self._credentials is not None:
            await self._credentials.close()
