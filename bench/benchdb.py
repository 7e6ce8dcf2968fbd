"""The bench's own database: `cp_bench`, recreated on the cluster of the settings' default database, migrated,
with a superuser, an API token and an enrollment token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "cp_bench"

SETUP_CODE = """
import json
from django.contrib.auth import get_user_model
from agents_app.registry import create_api_token, create_enrollment_token
user = get_user_model().objects.create_superuser("bench", "bench@example.com", "bench-password-not-secret")
api, _ = create_api_token(user, note="bench")
enrollment, _ = create_enrollment_token(note="bench")
print("BENCH-TOKENS " + json.dumps({"api": api, "enrollment": enrollment}))
"""


def default_database() -> dict:
    """The settings' default database (starting the embedded PostgreSQL when DATABASE_URL is unset)."""
    sys.path.insert(0, str(ROOT))
    import importlib

    # A plain module import (no django.setup()), forgotten at once: a later django.setup() in this process,
    # with DATABASE_URL pointing at the bench database, must read the settings afresh.
    settings = importlib.import_module("control_plane.settings")
    sys.modules.pop("control_plane.settings", None)
    db = dict(settings.DATABASES["default"])
    if db.get("EMBEDDED"):
        from control_plane.embedded_pg.base import running

        db.update(running(db["EMBEDDED"]))
    return db


# Options Django's backend reads itself; the rest of OPTIONS are libpq connection parameters.
DJANGO_OPTIONS = {"pool", "server_side_binding", "isolation_level", "assume_role", "cursor_factory"}


def _libpq_options(db: dict) -> dict:
    return {
        k: v
        for k, v in (db.get("OPTIONS") or {}).items()
        if k not in DJANGO_OPTIONS and isinstance(v, str | int) and not isinstance(v, bool)
    }


def database_url(db: dict, name: str) -> str:
    """A DATABASE_URL that control_plane.settings.database_from_url reads back as `db` with NAME = name."""
    auth = quote(db["USER"], safe="") + (":" + quote(db["PASSWORD"], safe="") if db.get("PASSWORD") else "")
    host, port = db["HOST"] or "", db.get("PORT") or ""
    options = _libpq_options(db)
    if host.startswith("/") or not host:
        netloc = f"{auth}@:{port}" if port else f"{auth}@"
        if host:
            options["host"] = host
    else:
        netloc = f"{auth}@{'[' + host + ']' if ':' in host else host}:{port or 5432}"
    query = "&".join(f"{quote(str(k))}={quote(str(v), safe='')}" for k, v in options.items())
    return f"postgresql://{netloc}/{quote(name)}" + (f"?{query}" if query else "")


def _admin_conninfo(db: dict) -> dict:
    params = {"dbname": "postgres", "user": db["USER"], "host": db["HOST"] or None}
    if db.get("PORT"):
        params["port"] = db["PORT"]
    if db.get("PASSWORD"):
        params["password"] = db["PASSWORD"]
    params.update(_libpq_options(db))
    return {k: v for k, v in params.items() if v is not None}


def recreate(log=print) -> dict:
    """Drop and create cp_bench, migrate it, add the bench's user and tokens. Returns
    {"url", "api", "enrollment", "admin" (connection parameters for the `postgres` database), "local"}."""
    import psycopg

    db = default_database()
    with psycopg.connect(**_admin_conninfo(db), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
        data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    url = database_url(db, BENCH_DB)
    env = {**os.environ, "DATABASE_URL": url}
    log(f"migrating {BENCH_DB} ...")
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", SETUP_CODE],
        cwd=ROOT,
        env={**env, "LOG_LEVEL": "WARNING"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH-TOKENS "))
    tokens = json.loads(line.split(" ", 1)[1])
    return {"url": url, **tokens, "admin": _admin_conninfo(db), "local": _is_local(data_dir)}


def _is_local(data_dir: str) -> bool:
    """Whether the cluster runs on this machine (so its processes' CPU can be read from /proc)."""
    try:
        pid = int(Path(data_dir, "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()
