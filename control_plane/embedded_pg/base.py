"""Django's PostgreSQL backend for the embedded cluster (control_plane/embedded_db.py), started on the first
connection rather than when the settings are imported: `manage.py check`, `--help`, collectstatic or a
test that never touches the database start no PostgreSQL.

The cluster's socket folder and port are known once it runs, so they are filled into the settings' own
dict then (the dict every thread's connection shares), once per process."""

from __future__ import annotations

import threading
from pathlib import Path

from django.db.backends.postgresql import base

_lock = threading.Lock()
_running: dict[str, str] = {}


def running(settings_dict: dict) -> dict[str, str]:
    """HOST and PORT of the embedded cluster holding settings_dict's database, starting it if it is down."""
    with _lock:
        if not _running:
            from control_plane.embedded_db import ensure_running

            started = ensure_running(Path(settings_dict["DATA_DIR"]), settings_dict["DATABASE"])
            _running.update(HOST=started["HOST"], PORT=started["PORT"])
    return dict(_running)


class DatabaseWrapper(base.DatabaseWrapper):
    def get_connection_params(self):
        if not self.settings_dict.get("HOST"):
            self.settings_dict.update(running(self.settings_dict["EMBEDDED"]))
        return super().get_connection_params()
