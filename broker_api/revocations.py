"""How the operator's revocations reach NATS servers that are already running, without a restart.

`tokenyard auth init` writes `DIR/nats-revocations.json` when it replaces credentials
(`broker_api.nats_auth`), and a server refuses them only once the account JWT it holds lists
them. Two paths deliver that JWT, because neither reaches every deployment alone:

- `push_operator`, run by `auth init` itself right after it writes the file: it connects to the
  NATS it is pointed at (`--nats-url`) as the system account's user (`DIR/creds/sys.creds`),
  reads the account JWT the servers hold, and pushes it again with the operator's revocations
  added. It keeps every revocation the servers hold (the nodes' a gateway pushed), since it
  has no node registry to read. It is the only path where no gateway holds DIR (compose and
  Kubernetes hand each gateway its own credentials only) and it answers the operator at once.
- `RevocationWatch`, in every gateway with an auth dir: it looks at the file's identity (inode,
  size, mtime) every `POLL` seconds and, when that changed, runs `Enrolment.sync`, which pushes
  the registry's revocations with the file's and converges with the other gateways. It covers
  an `auth init` that could not reach NATS (run elsewhere, on the directory a gateway holds),
  `tokenyard up`'s own `AuthDir.init`, and a sync that failed (retried with a growing pause).

A push replaces the whole account JWT, so the CLI's merge can undo a node change a gateway
pushed between its read and its push (milliseconds); the next sync of any gateway, at the next
node change or file change, puts the registry's view back.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import nats.errors
import structlog

from broker_api.enrolment import Credentials, Enrolment
from broker_api.nats_auth import AuthDir
from schemas.errors import NoCapacityError, UnavailableError
from schemas.settings import NatsSettings

log = structlog.get_logger(__name__)

POLL = 2.0  # how often a gateway looks at the revocations file: a revocation reaches NATS within it
RETRY_MAX = 60.0  # the longest pause between the retries of a sync that failed


FileIdentity = tuple[int, int, int] | None  # inode, size, mtime (ns); None: no file


def identify(path: Path) -> FileIdentity:
    """What tells one version of a file from the next: `write_secret` replaces it (a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class RevocationWatch:
    """Push again whenever the auth dir's revocations file changes (see the module's note)."""

    def __init__(self, enrolment: Enrolment, path: Path, *, seen: FileIdentity, due: bool, every: float) -> None:
        self._enrolment = enrolment
        self._path = path
        self._seen = seen
        self._due = due  # a sync failed or the file changed: push at the next look
        self._every = every
        self._task = asyncio.create_task(self._run(), name="revocation-watch")

    @classmethod
    async def start(cls, enrolment: Enrolment, auth: AuthDir, *, every: float = POLL) -> RevocationWatch:
        """Push what the servers must refuse now, if anything (credentials replaced while no
        gateway ran, a change another gateway could not push, a server whose resolver lost it),
        then watch. A failed push is retried by the watch."""
        seen = identify(auth.revocations_path)  # before the sync: a change during it is pushed again
        due = False
        try:
            if enrolment.revokes_any():
                await enrolment.sync()
        except (NoCapacityError, UnavailableError) as e:
            log.warning("nodes.sync_failed", error=e.message)
            due = True
        return cls(enrolment, auth.revocations_path, seen=seen, due=due, every=every)

    async def _run(self) -> None:
        pause = self._every
        while True:
            await asyncio.sleep(pause if self._due else self._every)
            try:
                now = identify(self._path)
                if now != self._seen:
                    self._seen, self._due = now, True
                    log.info("nodes.revocations_changed", path=str(self._path))
                if self._due:
                    await self._enrolment.sync()
                    self._due, pause = False, self._every
            except (NoCapacityError, UnavailableError) as e:
                pause = min(RETRY_MAX, pause * 2)
                log.warning("nodes.sync_failed", error=e.message, retry_in=pause)
            except Exception:  # the top of the loop: a gateway keeps watching whatever one look raised
                pause = min(RETRY_MAX, pause * 2)
                log.exception("nodes.revocation_watch_failed", retry_in=pause)

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise


class PushError(Exception):
    """The servers could not be reached, or did not take the account JWT; says why."""


async def push_operator(auth: AuthDir, nats_settings: NatsSettings) -> int:
    """Make the servers at `nats_settings.url` refuse every operator revocation of `auth`,
    keeping the revocations they hold. Returns how many they lacked (0: nothing was pushed).
    Raises PushError."""
    wanted = auth.revoked()
    try:
        credentials = await Credentials.open(auth, nats_settings, once=True)
    except (OSError, asyncio.TimeoutError, nats.errors.Error) as e:  # the socket's, TLS's (OSError) or NATS's
        raise PushError(f"could not connect to NATS at {nats_settings.url} ({type(e).__name__}: {e})") from e
    try:
        held = await credentials.held()
        missing = {user: at for user, at in wanted.items() if held.get(user, -1) < at}
        if missing:
            await credentials.push({**held, **missing})
            held = await credentials.held()
        lacking = [user for user, at in wanted.items() if held.get(user, -1) < at]
        if lacking:  # another push replaced ours at once (a gateway's, from an older read of the file)
            raise PushError(f"NATS at {nats_settings.url} still accepts {len(lacking)} of them after the push")
        return len(missing)
    except NoCapacityError as e:
        raise PushError(f"NATS at {nats_settings.url}: {e.message}") from e
    finally:
        await credentials.close()
