"""Database calls from async views: each borrows a pooled connection only for the duration of one unit of
work, and is refused at once (503) while the database is unreachable (control_plane/db_outage.py)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import connections

from control_plane.db_outage import DATABASE, DatabaseUnavailable, StatementRefused, is_unavailable, still_connected

# Database work of async views runs here. Threads are shared by all requests and no request keeps one
# while it waits, so thousands of parked long polls cost no threads and no connections.
DB_EXECUTOR = ThreadPoolExecutor(max_workers=settings.CP_DB_THREADS, thread_name_prefix="db")


def db_call(fn):
    """Run `fn` on the database executor and give its connection back to the pool afterwards.

    A plain run_in_executor rather than asgiref's sync_to_async: that one builds a wrapper, copies the
    context and checks the function on every call, which showed up in the hot path's profile. Django's
    connections are thread-local, so the executor thread's own connection is used and released here.

    Raises DatabaseUnavailable at once while the database is known unreachable, and in place of the error
    of a call that finds it so (which opens the breaker for every other call of this process)."""

    def run(args, kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if is_unavailable(exc) and still_connected():  # only the statement failed: no breaker for it
                raise StatementRefused(str(exc)) from exc
            raise
        finally:
            connections.close_all()

    async def call(*args, **kwargs):
        generation = DATABASE.check()
        try:
            return await asyncio.get_running_loop().run_in_executor(DB_EXECUTOR, run, args, kwargs)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            DATABASE.failed(exc, generation)
            raise DatabaseUnavailable("the database is unreachable") from exc

    return call
