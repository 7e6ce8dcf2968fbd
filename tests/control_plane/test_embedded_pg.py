"""The embedded PostgreSQL starts with the first connection, not with the settings: commands that need no
database start none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_ALLOW_ASYNC_UNSAFE")}
    env["CP_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_importing_the_settings_and_checking_the_project_start_no_postgresql(tmp_path):
    imported = run(["-c", "import control_plane.settings as s; print(s.DATABASES['default']['ENGINE'])"], tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "control_plane.embedded_pg"
    checked = run(["manage.py", "check"], tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "no issues" in checked.stdout
    assert not (tmp_path / "pg").exists()


def test_a_database_url_is_used_as_given(tmp_path):
    url = "postgresql://someone@127.0.0.1:6543/elsewhere"
    code = "import control_plane.settings as s; d = s.DATABASES['default']; print(d['ENGINE'], d['PORT'], d['NAME'])"
    env_run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}, "DATABASE_URL": url,
             "CP_DATA_DIR": str(tmp_path)},
    )  # fmt: skip
    assert env_run.stdout.split() == ["django.db.backends.postgresql", "6543", "elsewhere"], env_run.stderr
